"""The settings file: production settings pass Django's deployment checks, and bad values
stop the process at start-up instead of running with a silent default."""

import json
import secrets
import subprocess
import sys

import pytest

from tests.support.processes import ROOT

PRODUCTION = {
    "DJANGO_DEBUG": "0",
    "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
    "DJANGO_ALLOWED_HOSTS": "chat.example.com",
    "DJANGO_SECURE_SSL_REDIRECT": "1",
    "DJANGO_SESSION_COOKIE_SECURE": "1",
    "DJANGO_CSRF_COOKIE_SECURE": "1",
    "DJANGO_SECURE_HSTS_SECONDS": "31536000",
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS": "1",
    "DJANGO_SECURE_HSTS_PRELOAD": "1",
    "DATABASE_URL": "postgres://grizz@db.example.com:5432/grizz",
    "PATH": "/usr/bin:/bin",
}


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_settings_pass_the_deployment_checks():
    result = _manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_it_refuses_to_start_without_a_secret_key_in_production():
    env = {**PRODUCTION, "DJANGO_SECRET_KEY": ""}
    result = _manage("check", **env)
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set" in result.stderr


def test_it_has_a_development_secret_only_in_debug():
    env = {**PRODUCTION, "DJANGO_SECRET_KEY": "", "DJANGO_DEBUG": "1"}
    assert _manage("check", **env).returncode == 0


def test_it_rejects_a_malformed_number():
    result = _manage("check", **{**PRODUCTION, "LLM_JOB_LEASE_SECONDS": "thirty"})
    assert result.returncode != 0
    assert "LLM_JOB_LEASE_SECONDS must be a number" in result.stderr


def test_it_rejects_a_malformed_rate():
    result = _manage("check", **{**PRODUCTION, "CHAT_RATE_LIMIT": "20 per minute"})
    assert result.returncode != 0
    assert "CHAT_RATE_LIMIT must look like 20/min" in result.stderr


def test_it_rejects_a_malformed_boolean():
    result = _manage("check", **{**PRODUCTION, "DJANGO_DEBUG": "maybe"})
    assert result.returncode != 0
    assert "DJANGO_DEBUG must be a boolean" in result.stderr


def test_it_rejects_a_transport_limit_below_the_frame_limit():
    env = {**PRODUCTION, "WS_MAX_FRAME_BYTES": "65536", "WS_TRANSPORT_MAX_BYTES": "1024"}
    result = _manage("check", **env)
    assert result.returncode != 0
    assert "WS_TRANSPORT_MAX_BYTES must be at least 65536" in result.stderr


def test_it_rejects_a_consumer_removal_bound_a_live_idle_worker_reaches():
    # A live worker with nothing to do reads every 5 s: 5 s idle is not dead.
    result = _manage("check", **{**PRODUCTION, "LLM_CONSUMER_REMOVE_IDLE_SECONDS": "5"})
    assert result.returncode != 0
    assert "LLM_CONSUMER_REMOVE_IDLE_SECONDS must be at least 10.0" in result.stderr


def test_it_rejects_autoscale_bounds_out_of_order():
    result = _manage("check", **{**PRODUCTION, "LLM_WORKER_AUTOSCALE": "4,2"})
    assert result.returncode != 0
    assert "LLM_WORKER_AUTOSCALE must be MIN,MAX with 1 <= MIN <= MAX, got '4,2'" in result.stderr


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("METRICS_TOKEN", "short", "METRICS_TOKEN must be at least 16 characters"),
        ("LLM_WORKER_METRICS_PORT", "70000", "LLM_WORKER_METRICS_PORT must be at most 65535"),
    ],
)
def test_it_rejects_a_weak_metrics_token_and_a_port_out_of_range(name, value, said):
    result = _manage("check", **{**PRODUCTION, name: value})
    assert result.returncode != 0
    assert said in result.stderr


PRINT_MODELS = "from django.conf import settings; print(settings.LLM_MODEL, settings.LLM_MODELS)"


def _models_printed(**env: str) -> str:
    # The last line: `shell` may say first what it imported.
    return _manage("shell", "-c", PRINT_MODELS, **{**PRODUCTION, **env}).stdout.splitlines()[-1]


def test_it_offers_the_default_model_alone_unless_told_otherwise():
    assert _models_printed(LLM_MODEL="bear-1") == "bear-1 ['bear-1']"


def test_it_offers_the_models_listed_with_the_default_among_them():
    printed = _models_printed(LLM_MODEL="bear-1", LLM_MODELS=" bear-2, bear-1 ")
    assert printed == "bear-1 ['bear-2', 'bear-1']"


@pytest.mark.parametrize(
    ("models", "said"),
    [
        ("bear-1,,bear-2", "LLM_MODELS must be names separated by commas, got 'bear-1,,bear-2'"),
        ("bear-1,", "LLM_MODELS must be names separated by commas, got 'bear-1,'"),
        ("bear-1,bear-2,bear-1", "LLM_MODELS names bear-1 more than once"),
        (f"bear-1,{'b' * 101}", f"LLM_MODELS: '{'b' * 101}' is over 100 characters"),
        ("bear-2,bear-3", "LLM_MODELS must include LLM_MODEL ('bear-1'), got bear-2, bear-3"),
    ],
)
def test_it_rejects_a_malformed_list_of_models(models, said):
    result = _manage("check", **{**PRODUCTION, "LLM_MODEL": "bear-1", "LLM_MODELS": models})
    assert result.returncode != 0
    assert said in result.stderr


def test_it_rejects_an_unknown_log_format():
    result = _manage("check", **{**PRODUCTION, "LOG_FORMAT": "xml"})
    assert result.returncode != 0
    assert "LOG_FORMAT must be one of json, text, got 'xml'" in result.stderr


LOG_A_LINE = "import logging; logging.getLogger('grizz').warning('a line for the operator')"


def test_it_logs_json_in_production_and_plain_text_in_debug():
    production = _manage("shell", "-c", LOG_A_LINE, **PRODUCTION)
    debug = _manage("shell", "-c", LOG_A_LINE, **{**PRODUCTION, "DJANGO_DEBUG": "1"})

    (line,) = production.stderr.splitlines()
    assert (
        json.loads(line).items()
        >= {"level": "WARNING", "message": "a line for the operator"}.items()
    )
    assert debug.stderr.rstrip().endswith("WARNING MainProcess grizz a line for the operator")


def test_it_logs_a_crash_as_one_json_line():
    result = _manage("shell", "-c", "raise RuntimeError('out of cheese')", **PRODUCTION)

    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    crash = json.loads(line)
    assert crash["level"] == "CRITICAL"
    assert crash["exc_info"].startswith("Traceback (most recent call last):")
    assert crash["exc_info"].endswith("RuntimeError: out of cheese")
