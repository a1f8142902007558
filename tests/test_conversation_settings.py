"""A conversation's settings, its model and system prompt: the models a deployment offers,
the checks of chat/services.py behind the REST API and the chat page's panel, and the next
reply asking the model server for them."""

import re
import uuid

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ValidationError
from django.test import Client
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import AccessToken

from chat.models import Conversation, Message
from chat.services import conversation_create, conversation_update
from tests.support.fake_openai import Behaviour
from tests.support.sockets import chat_opened, message_queued

pytestmark = pytest.mark.django_db(transaction=True)

MODELS_URL = "/api/models/"


def conversation_url(conversation_id: object) -> str:
    return f"/api/conversations/{conversation_id}/"


def client_as(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {AccessToken.for_user(user)}")
    return client


def patched(user, conversation, **body: object):
    return client_as(user).patch(conversation_url(conversation.id), body, format="json")


# --- The models offered -----------------------------------------------------------------


def test_it_lists_the_models_offered_and_the_default(alice, offered_models):
    response = client_as(alice).get(MODELS_URL)
    assert response.status_code == 200
    assert response.json() == {"default": "fake-model", "models": ["fake-model", "fake-large"]}


def test_it_offers_only_the_demo_model_without_an_api_key(alice, offered_models, settings):
    settings.OPENAI_API_KEY = ""
    conversation = conversation_create(owner=alice)

    listed = client_as(alice).get(MODELS_URL).json()
    refused = patched(alice, conversation, model="fake-large")

    assert listed == {"default": "grizz-demo", "models": ["grizz-demo"]}
    assert refused.status_code == 400
    assert refused.json()["error"]["fields"] == {
        "model": ["'fake-large' is not offered here; the models are grizz-demo."]
    }


def test_it_returns_401_for_the_models_without_credentials():
    response = APIClient().get(MODELS_URL)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


# --- Changing them through the API --------------------------------------------------------


def test_it_changes_the_model_without_moving_the_conversation_in_the_list(alice, offered_models):
    changed = conversation_create(owner=alice, title="Older")
    conversation_create(owner=alice, title="Newer")
    before = Conversation.objects.get(id=changed.id).updated_at

    response = patched(alice, changed, model=" fake-large ", system_prompt="Be a bear.")

    assert response.status_code == 200
    assert (response.json()["model"], response.json()["system_prompt"]) == (
        "fake-large",
        "Be a bear.",
    )
    assert client_as(alice).get(conversation_url(changed.id)).json()["model"] == "fake-large"
    assert Conversation.objects.get(id=changed.id).updated_at == before


def test_it_refuses_a_model_not_offered_and_keeps_every_setting(alice, offered_models):
    conversation = conversation_create(owner=alice, system_prompt="Kept.")

    response = patched(alice, conversation, model="gpt-9", system_prompt="Changed.")

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "invalid",
            "message": "model: 'gpt-9' is not offered here; the models are fake-model, fake-large.",
            "fields": {
                "model": ["'gpt-9' is not offered here; the models are fake-model, fake-large."]
            },
        }
    }
    conversation.refresh_from_db()
    assert (conversation.model, conversation.system_prompt) == ("", "Kept.")


def test_it_refuses_to_create_a_conversation_with_a_model_not_offered(alice, offered_models):
    response = client_as(alice).post("/api/conversations/", {"model": "gpt-9"}, format="json")
    assert response.status_code == 400
    assert list(response.json()["error"]["fields"]) == ["model"]
    assert not Conversation.objects.exists()


def test_it_goes_back_to_the_default_model_with_a_blank_one(alice, offered_models):
    conversation = conversation_create(owner=alice, model="fake-large")
    response = patched(alice, conversation, model="")
    assert response.status_code == 200
    assert Conversation.objects.get(id=conversation.id).model == ""


def test_it_keeps_a_model_no_longer_offered_until_another_is_chosen(alice, offered_models):
    conversation = conversation_create(owner=alice, model="bear-0")

    kept = patched(alice, conversation, model="bear-0", system_prompt="Still bear-0.")
    refused = patched(alice, conversation, model="bear-00")

    assert kept.status_code == 200
    assert refused.status_code == 400
    conversation.refresh_from_db()
    assert (conversation.model, conversation.system_prompt) == ("bear-0", "Still bear-0.")


def test_it_refuses_a_system_prompt_over_the_message_limit_with_too_long(alice, offered_models):
    conversation = conversation_create(owner=alice, system_prompt="Kept.")
    prompt = "p" * (settings.CHAT_MAX_MESSAGE_CHARS + 1)
    response = patched(alice, conversation, system_prompt=prompt)
    assert response.status_code == 400
    assert (response.json()["error"]["code"], list(response.json()["error"]["fields"])) == (
        "too_long",
        ["system_prompt"],
    )
    assert Conversation.objects.get(id=conversation.id).system_prompt == "Kept."


def test_it_checks_the_settings_in_the_service_for_every_caller(alice, offered_models):
    conversation = conversation_create(owner=alice)
    prompt = "p" * (settings.CHAT_MAX_MESSAGE_CHARS + 1)

    with pytest.raises(ValidationError) as refused:
        conversation_update(conversation=conversation, model="gpt-9", system_prompt=prompt)

    assert set(refused.value.message_dict) == {"model", "system_prompt"}
    assert [e.code for e in refused.value.error_dict["system_prompt"]] == ["max_length"]
    assert Conversation.objects.get(id=conversation.id).model == ""


def test_it_returns_404_for_changing_another_users_settings(alice, bob, offered_models):
    conversation = conversation_create(owner=alice, system_prompt="Alice's prompt.")
    response = patched(bob, conversation, model="fake-large", system_prompt="Bob's.")
    assert response.status_code == 404
    assert b"Alice" not in response.content
    conversation.refresh_from_db()
    assert (conversation.model, conversation.system_prompt) == ("", "Alice's prompt.")


def test_it_returns_404_for_the_settings_of_an_unknown_conversation(alice, offered_models):
    assert patched(alice, Conversation(id=uuid.uuid4()), model="").status_code == 404


# --- The chat page's panel ----------------------------------------------------------------

OPTION = re.compile(r'<option value="([^"]*)"( selected)?>([^<]*)</option>')


def panel_options(user, conversation) -> list[tuple[str, bool, str]]:
    client = Client()
    client.force_login(user)
    html = client.get(f"/c/{conversation.id}/").content.decode()
    return [(value, bool(selected), label) for value, selected, label in OPTION.findall(html)]


def test_it_offers_the_default_first_then_the_other_models(alice, offered_models):
    conversation = conversation_create(owner=alice, model="fake-large")
    assert panel_options(alice, conversation) == [
        ("", False, "Default (fake-model)"),
        ("fake-large", True, "fake-large"),
    ]


def test_it_selects_the_default_of_a_conversation_that_names_no_model(alice, offered_models):
    conversation = conversation_create(owner=alice)
    assert panel_options(alice, conversation)[0] == ("", True, "Default (fake-model)")


def test_it_shows_a_model_no_longer_offered_as_such(alice, offered_models):
    conversation = conversation_create(owner=alice, model="bear-0")
    assert panel_options(alice, conversation)[-1] == ("bear-0", True, "bear-0 (no longer offered)")


def test_it_offers_the_demo_model_alone_in_demo_mode(alice, settings):
    settings.OPENAI_API_KEY = ""
    conversation = conversation_create(owner=alice)
    assert panel_options(alice, conversation) == [("", True, "Default (grizz-demo)")]


# --- The next reply -------------------------------------------------------------------------


async def test_it_asks_the_model_server_for_the_chosen_model_and_system_prompt(
    alice, offered_models, fake_llm, worker
):
    fake_llm.default = Behaviour(reply="Grr.")
    conversation = await sync_to_async(conversation_create)(owner=alice)
    socket = await chat_opened(alice, conversation.id)

    await sync_to_async(patched)(
        alice, conversation, model="fake-large", system_prompt="You are a bear."
    )
    chosen = await message_queued(socket, "Who are you?")
    await socket.receive_until("done")
    await sync_to_async(patched)(alice, conversation, model="", system_prompt="")
    default = await message_queued(socket, "And now?")
    await socket.receive_until("done")
    await socket.close()

    first, second = fake_llm.requests
    assert first["model"] == "fake-large"
    assert first["messages"] == [
        {"role": "system", "content": "You are a bear."},
        {"role": "user", "content": "Who are you?"},
    ]
    assert second["model"] == "fake-model"
    assert second["messages"][0] == {"role": "user", "content": "Who are you?"}
    models = {
        str(reply.job_id): reply.model
        async for reply in Message.objects.filter(role="assistant", conversation=conversation)
    }
    assert models == {chosen["job_id"]: "fake-large", default["job_id"]: "fake-model"}
