"""The ports the test servers listen on: never one an outgoing connection can take first."""
import socket
from pathlib import Path

from keras_serve.tools.ports import free_ports


def outgoing_range() -> range:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(low, high + 1)


def test_free_ports_are_distinct_bindable_and_outside_the_outgoing_range():
    ports = free_ports(64)
    assert len(set(ports)) == 64
    outgoing = outgoing_range()
    assert not [p for p in ports if p in outgoing], ports
    assert all(1024 <= p < 65536 for p in ports)
    for port in ports[:8]:
        with socket.create_server(("127.0.0.1", port)):
            pass


def test_a_port_already_listening_is_skipped_for_another(monkeypatch):
    import random

    choose = random.choice
    with socket.create_server(("127.0.0.1", free_ports(1)[0])) as taken:
        port = taken.getsockname()[1]
        offered = iter([port, port, port])  # the listening port comes up three times first
        monkeypatch.setattr(random, "choice", lambda candidates: next(offered, None) or choose(candidates))
        ports = free_ports(2)
    assert port not in ports and len(set(ports)) == 2


def test_a_seaweedfs_whose_port_was_taken_at_first_start_starts_on_fresh_ports():
    from services import SeaweedFS

    server = SeaweedFS()
    try:
        first = dict(server.ports)
        # What happens when another process binds a chosen port before weed does.
        with socket.create_server(("127.0.0.1", first["filer_grpc"])):
            server.start()
            assert server.ports["filer_grpc"] != first["filer_grpc"]
            assert server.endpoint == f"http://127.0.0.1:{server.ports['s3']}"
            client = server.client()
            client.put_object(Bucket=server.bucket, Key="after-a-retry", Body=b"kept")
            assert client.get_object(Bucket=server.bucket, Key="after-a-retry")["Body"].read() == b"kept"
    finally:
        server.destroy()
