"""A job: one assistant reply to generate. It travels as the fields of a Redis Stream entry."""

from dataclasses import MISSING, asdict, dataclass, fields


class InvalidJob(ValueError):
    pass


@dataclass(frozen=True, kw_only=True)
class Job:
    job_id: str
    reply_id: str
    conversation_id: str
    user_id: str = ""  # whose in-flight count the job holds until it finishes
    priority: str = "normal"  # or "high": read first by the workers (queue.py)

    def to_fields(self) -> dict[str, str]:
        return asdict(self)

    def log_fields(self) -> dict[str, str]:
        """The ids that the log lines about this job carry (grizz/logs.py)."""
        return {
            "job_id": self.job_id,
            "reply_id": self.reply_id,
            "conversation_id": self.conversation_id,
            "user_id": self.user_id,
        }

    @classmethod
    def from_fields(cls, data: dict[str, str]) -> "Job":
        required = [f.name for f in fields(cls) if f.default is MISSING]
        if missing := [name for name in required if name not in data]:
            raise InvalidJob(f"job entry lacks {missing}")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
