"""Create the bench's users and conversations, one conversation per user, and print one JSON
line per conversation: ``{"conversation_id": ..., "token": <access token>}``.

Run by the bench inside its deployment's environment (``python -m bench.seed 5000``); bulk
inserts with unusable passwords, because hashing thousands of passwords takes minutes.
"""

import json
import os
import sys


def main(count: int) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "grizz.settings")
    import django

    django.setup()
    from django.contrib.auth.hashers import make_password
    from django.contrib.auth.models import User
    from rest_framework_simplejwt.tokens import AccessToken

    from chat.models import Conversation

    users = User.objects.bulk_create(
        [User(username=f"bench-{i}", password=make_password(None)) for i in range(count)],
        batch_size=1000,
    )
    conversations = Conversation.objects.bulk_create(
        [Conversation(owner=user, title=f"bench {i}") for i, user in enumerate(users)],
        batch_size=1000,
    )
    lines = (
        json.dumps({"conversation_id": str(conv.id), "token": str(AccessToken.for_user(user))})
        for user, conv in zip(users, conversations, strict=True)
    )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(int(sys.argv[1]))
