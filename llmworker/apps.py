from django.apps import AppConfig


class LlmWorkerConfig(AppConfig):
    name = "llmworker"
    verbose_name = "LLM worker"
