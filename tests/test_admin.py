import pytest
from django.contrib.auth.models import User
from django.test import Client
from chat.services import conversation_create, message_send

@pytest.mark.django_db(transaction=True)
def test_probe(alice):
    root = User.objects.create_superuser("root", "root@example.com", "root-password-1")
    c = conversation_create(owner=alice, title="T")
    message_send(conversation=c, content="hello <b>x</b>")
    client = Client(); client.force_login(root)
    r = client.get(f"/admin/chat/conversation/{c.id}/change/")
    open("/tmp/probe_change.html","wb").write(r.content)
    r = client.get("/admin/chat/message/add/")
    print("add page", r.status_code)
    r = client.post("/admin/chat/message/add/", {})
    print("add post", r.status_code)
