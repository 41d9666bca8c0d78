#!/usr/bin/env python3
"""A small egpu client in Python: generate text over egpud's Unix socket.

It shows that any language with gRPC can share the device with egpuctl and other apps. The
stubs are generated from proto/egpu.proto on first use (grpcio-tools), so the .proto file
stays the only contract.

    PYTHONPATH=$(scripts/python-deps.sh) python3 clients/python/egpu_client.py \
        --model smollm2 "The capital of France is"

Options: --socket PATH (default: $EGPU_SOCKET, else $XDG_RUNTIME_DIR/egpu.sock, else
/tmp/egpu-$UID/egpu.sock), --max-tokens N, --raw, --json (one JSON object at the end instead of
streamed text), --services (list the services egpud offers, found by gRPC reflection).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE.parent.parent / "proto"
GENERATED = HERE / "_generated"


def load_stubs():
    """Generates (once) and imports the egpu.v1 message and service modules."""
    proto = PROTO_DIR / "egpu.proto"
    target_pb2 = GENERATED / "egpu_pb2.py"
    if not target_pb2.exists() or target_pb2.stat().st_mtime < proto.stat().st_mtime:
        from grpc_tools import protoc

        GENERATED.mkdir(exist_ok=True)
        code = protoc.main(
            [
                "protoc",
                f"-I{PROTO_DIR}",
                f"--python_out={GENERATED}",
                f"--grpc_python_out={GENERATED}",
                str(proto),
            ]
        )
        if code != 0:
            sys.exit(f"egpu_client: protoc failed on {proto}")
    sys.path.insert(0, str(GENERATED))
    import egpu_pb2
    import egpu_pb2_grpc

    return egpu_pb2, egpu_pb2_grpc


def default_socket():
    if os.environ.get("EGPU_SOCKET"):
        return os.environ["EGPU_SOCKET"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "egpu.sock")
    return f"/tmp/egpu-{os.getuid()}/egpu.sock"


def check_socket_is_ours(path):
    """Refuses a socket that another user owns or serves: in a shared folder another user could
    put their own socket at the path and read every request (egpuctl checks the same)."""
    import socket
    import struct

    owner = os.stat(path).st_uid
    if owner != os.getuid():
        sys.exit(f"egpu_client: {path} belongs to uid {owner}, not to you (uid {os.getuid()}); refusing it")
    if hasattr(socket, "SO_PEERCRED"):  # Linux: the process behind the socket must be ours too
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            _pid, uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid():
            sys.exit(f"egpu_client: the process serving {path} runs as uid {uid}, not as you; refusing it")


def list_services(channel):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    return sorted(ProtoReflectionDescriptorDatabase(channel).get_services())


def main():
    parser = argparse.ArgumentParser(description="Generate text with egpud over its socket.")
    parser.add_argument("prompt", nargs="?", default="")
    parser.add_argument("--model", default="")
    parser.add_argument("--socket", default=default_socket())
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--raw", action="store_true", help="no chat template")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--services", action="store_true")
    args = parser.parse_args()

    if not os.path.exists(args.socket):
        sys.exit(f"egpu_client: egpud is not running: no socket at {args.socket}")
    check_socket_is_ours(args.socket)
    pb, pb_grpc = load_stubs()
    # grpc-core would send the socket path as the HTTP/2 :authority, which is not a valid
    # authority; name a plain host instead (the socket decides where the bytes go).
    options = [("grpc.default_authority", "localhost")]
    with grpc.insecure_channel(f"unix:{args.socket}", options=options) as channel:
        if args.services:
            for name in list_services(channel):
                print(name)
            return
        stub = pb_grpc.EgpuStub(channel)
        request = pb.GenerateRequest(
            model=args.model,
            prompt=args.prompt,
            raw=args.raw,
            max_tokens=args.max_tokens,
        )
        text, token_ids, done = [], [], None
        try:
            for event in stub.Generate(request, metadata=[("x-egpu-client", "python-example")]):
                if event.HasField("chunk"):
                    text.append(event.chunk.text)
                    token_ids.extend(event.chunk.token_ids)
                    if not args.json:
                        print(event.chunk.text, end="", flush=True)
                elif event.HasField("done"):
                    done = event.done
        except grpc.RpcError as err:
            sys.exit(f"egpu_client: {err.code().name}: {err.details()}")
        if args.json:
            print(
                json.dumps(
                    {
                        "text": "".join(text),
                        "token_ids": token_ids,
                        "finish_reason": pb.FinishReason.Name(done.finish_reason)
                        .removeprefix("FINISH_REASON_")
                        .lower(),
                        "completion_tokens": done.completion_tokens,
                        "decode_tokens_per_s": done.timings.decode_tokens_per_s,
                    }
                )
            )
        else:
            print()


if __name__ == "__main__":
    main()
