"""A job: one assistant reply to generate. It travels as the fields of a Redis Stream entry."""

from dataclasses import asdict, dataclass, fields


class InvalidJob(ValueError):
    pass


@dataclass(frozen=True, kw_only=True)
class Job:
    job_id: str
    reply_id: str
    conversation_id: str

    def to_fields(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_fields(cls, data: dict[str, str]) -> "Job":
        try:
            return cls(**{f.name: data[f.name] for f in fields(cls)})
        except KeyError as missing:
            raise InvalidJob(f"job entry lacks {missing}") from None
