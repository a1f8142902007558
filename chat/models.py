import uuid
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.db.models import Q


class Conversation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, blank=True)
    model = models.CharField(max_length=100, blank=True)
    system_prompt = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["owner", "-updated_at"])]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.id}"


class Message(models.Model):
    class Role(models.TextChoices):
        SYSTEM = "system"
        USER = "user"
        ASSISTANT = "assistant"

    class Status(models.TextChoices):
        QUEUED = "queued"
        STREAMING = "streaming"
        COMPLETE = "complete"
        FAILED = "failed"
        CANCELLED = "cancelled"

    ACTIVE_STATUSES = (Status.QUEUED, Status.STREAMING)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(Conversation, models.CASCADE, related_name="messages")
    # Position in the transcript, assigned under a lock on the conversation: timestamps of
    # two rows written in one transaction may tie, positions never do.
    position = models.PositiveIntegerField()
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE)
    # The job that produces an assistant reply; at most one row per job, however many times
    # Redis delivers it.
    job_id = models.UUIDField(null=True, blank=True, unique=True, editable=False)
    # The client's own id for a message, so that a resent frame returns the original job.
    # NULL, not "", when absent: the uniqueness constraint must ignore messages without one.
    client_msg_id = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    # Fencing token: the delivery attempt that may write this reply. A worker that stalled
    # past its lease holds an older number and its writes match no row.
    attempt = models.PositiveIntegerField(default=0)
    # Attempts made before an operator's last retry of the reply (llm_dead_letters retry):
    # LLM_MAX_ATTEMPTS counts those after it. The attempt number itself only grows, as it
    # fences out older attempts.
    attempts_before_retry = models.PositiveIntegerField(default=0)
    # The Redis Stream entry of the job's latest delivery: if Redis reports the entry deleted
    # while pending, this finds the reply to fail.
    queue_entry_id = models.CharField(max_length=32, blank=True)
    model = models.CharField(max_length=100, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    total_tokens = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # When a regenerate replaced this answer with a new reply to the same question. The row
    # is kept for review, but left out of later prompts and of the chat page.
    superseded_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["conversation", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["conversation", "position"], name="message_unique_position"
            ),
            models.UniqueConstraint(
                fields=["conversation", "client_msg_id"],
                condition=Q(client_msg_id__isnull=False),
                name="message_unique_client_msg_id",
            ),
            # One reply in flight per conversation: "busy" holds across web processes.
            models.UniqueConstraint(
                fields=["conversation"],
                condition=Q(role="assistant", status__in=["queued", "streaming"]),
                name="message_one_active_reply",
            ),
        ]
        indexes = [models.Index(fields=["status", "updated_at"])]

    def __str__(self) -> str:
        return f"{self.role} #{self.position} in {self.conversation_id}"

    @property
    def usage(self) -> dict[str, int] | None:
        if self.total_tokens is None:
            return None
        return {
            "prompt_tokens": self.prompt_tokens or 0,
            "completion_tokens": self.completion_tokens or 0,
            "total_tokens": self.total_tokens,
        }

    @property
    def superseded(self) -> bool:
        return self.superseded_at is not None

    @property
    def latency(self) -> timedelta | None:
        """How long a finished reply took, from its user's message being sent (when the reply
        row is written) to its end: the wait in the queue and every attempt included."""
        if self.finished_at is None:
            return None
        return self.finished_at - self.created_at
