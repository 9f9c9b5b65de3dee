"""Writes events to eventjournal and follows a tag, from Python: the contract is plain gRPC.

    python3 -m pip install grpcio grpcio-tools
    python3 -m grpc_tools.protoc -I ../../proto/proto --python_out=. --grpc_python_out=. \
        eventjournal/v1/eventjournal.proto
    python3 follow_tag.py                      # against `make run` on 127.0.0.1:50051

Set EVENTJOURNAL_URL (host:port) and EVENTJOURNAL_TOKEN for another server.
"""

import os
import sys
import time

import grpc

from eventjournal.v1 import eventjournal_pb2 as pb
from eventjournal.v1 import eventjournal_pb2_grpc as rpc


def main() -> int:
    target = os.environ.get("EVENTJOURNAL_URL", "127.0.0.1:50051")
    token = os.environ.get("EVENTJOURNAL_TOKEN")
    metadata = [("authorization", f"Bearer {token}")] if token else []
    channel = grpc.insecure_channel(target)
    journal = rpc.JournalStub(channel)
    queries = rpc.ReadJournalStub(channel)

    pid = f"python-{int(time.time())}"
    writes = [
        pb.AtomicWrite(events=[pb.PersistentEvent(
            persistence_id=pid,
            sequence_nr=n,
            payload=pb.Payload(data=f"reading {n}".encode(), serializer_id=1, manifest="Text"),
            tags=["python"],
        )])
        for n in range(1, 4)
    ]
    response = journal.WriteEvents(pb.WriteEventsRequest(writes=writes), metadata=metadata)
    print("written:", [result.WhichOneof("outcome") for result in response.results])

    # Follow the tag live; stop after this run's three events.
    seen = 0
    stream = queries.EventsByTag(pb.EventsByTagRequest(tag="python"), metadata=metadata)
    for envelope in stream:
        event = envelope.event
        print(f"{event.persistence_id} #{event.sequence_nr}: {event.payload.data.decode()}")
        if event.persistence_id == pid:
            seen += 1
            if seen == 3:
                stream.cancel()
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
