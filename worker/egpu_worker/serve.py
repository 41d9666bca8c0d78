"""The worker process egpud supervises for `--backend tinygrad`.

    python -m egpu_worker.serve --socket PATH

Opens the tinygrad device named by DEV (default PCI+AMD on macOS, tinygrad's own choice
elsewhere), proves that it can compile and run a kernel, serves proto/worker.proto on the Unix
socket PATH, then prints `egpu-worker ready` on stdout. It exits when stdin reaches end of
file: egpud holds the other end of that pipe, so the worker never outlives it.

Everything that touches tinygrad (opening the device, Load, Unload, Step, CopyPrefix) runs on one
dedicated thread: the device runs one thing at a time, and tinygrad's state is not
thread-safe (its compile cache is an SQLite connection bound to the thread that opened it; a
CUDA context is current on one thread). Hello and Ping only read figures that thread
published, so heartbeats are answered while a long step runs.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import sys
import threading
import time
from concurrent import futures

from .env import default_cache_env

PROTOCOL_VERSION = 4
MAX_MESSAGE = 1 << 30  # a Score over a long text returns every position's logits


def default_dev() -> None:
  if "DEV" not in os.environ and sys.platform == "darwin":
    os.environ["DEV"] = "PCI+AMD"


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m egpu_worker.serve")
  ap.add_argument("--socket", required=True, help="Unix socket path to serve on")
  args = ap.parse_args(argv)
  default_dev()
  default_cache_env()
  import grpc
  import numpy as np
  from . import rpc
  pb, pb_grpc = rpc.load()
  device_thread = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="egpu-device")

  def on_device(fn, *args):
    return device_thread.submit(fn, *args).result()

  # Fault injection for egpud's tests: EGPU_WORKER_STALL=Unload (or Step, Load; comma-separated)
  # makes the device thread hang in that call as a wedged driver would, while the gRPC threads
  # (and so heartbeats) keep answering. egpud must notice by the call's deadline alone.
  stall_on = set(filter(None, os.environ.get("EGPU_WORKER_STALL", "").split(",")))

  def maybe_stall(call: str) -> None:  # on the device thread
    if call in stall_on:
      print(f"egpu-worker: EGPU_WORKER_STALL: the device thread hangs in {call}", file=sys.stderr, flush=True)
      threading.Event().wait()

  # EGPU_WORKER_HOLD_LOAD=<fifo>: Load blocks until the test writes to that named pipe and
  # closes it, so egpud's tests can hold a model in the loading state as long as they need.
  hold_load = os.environ.get("EGPU_WORKER_HOLD_LOAD")

  def maybe_hold_load() -> None:  # on the device thread
    if hold_load:
      print(f"egpu-worker: EGPU_WORKER_HOLD_LOAD: Load waits for {hold_load}", file=sys.stderr, flush=True)
      with open(hold_load, "rb") as fifo: fifo.read()

  def open_device():
    # tinygrad reads DEV and the cache location at import time: import it only now, there.
    from tinygrad import Device
    from .probe import device_info
    return Device.DEFAULT, device_info(os.environ.get("DEV", Device.DEFAULT))

  dev, info = on_device(open_device)
  from tinygrad import Device, GlobalCounters
  from .model import Config, StepItem, load_model
  from .probe import memory_free
  if info.get("error"):
    print(f"egpu-worker: device {info.get('dev')!r} unusable: {info['error']}", file=sys.stderr, flush=True)
    return 3
  device_msg = pb.DeviceInfo(
    dev=info.get("dev") or "", device=info.get("device") or dev, name=info.get("name") or "",
    arch=info.get("arch") or "", interface=info.get("interface") or "", renderer=info.get("renderer") or "",
    memory_total_bytes=int(info.get("memory_total_bytes") or 0), memory_free_bytes=int(info.get("memory_free_bytes") or 0),
    tinygrad_version=info.get("tinygrad_version") or "", python_version=platform.python_version())

  models: dict[int, object] = {}
  ids = itertools.count(1)
  logits_kind = {pb.LOGITS_WANTED_NONE: "none", pb.LOGITS_WANTED_LAST: "last", pb.LOGITS_WANTED_ALL: "all"}

  # Memory figures, published by the device thread after each call: Ping must not touch
  # tinygrad itself (tinygrad refuses device use from other threads).
  figures = {"allocated": 0, "cached": 0, "free": int(info.get("memory_free_bytes") or 0)}

  def publish(with_free: bool) -> None:  # on the device thread
    figures["allocated"] = int(GlobalCounters.mem_used_per_device.get(dev, GlobalCounters.mem_used))
    cache = getattr(Device[dev].allocator, "cache", {})
    figures["cached"] = int(sum(size * len(bufs) for (size, *_), bufs in cache.items()))
    if with_free: figures["free"] = int(memory_free(info) or 0)

  def fail(context, code, err: BaseException):
    context.abort(code, f"{type(err).__name__}: {err}")

  def guarded(fn):
    """Maps the model code's exceptions to statuses (see worker.proto)."""
    def call(self, request, context):
      try:
        return fn(self, request, context)
      except grpc.RpcError:
        raise
      except FileNotFoundError as e: fail(context, grpc.StatusCode.NOT_FOUND, e)
      except NotImplementedError as e: fail(context, grpc.StatusCode.UNIMPLEMENTED, e)
      except (ValueError, KeyError) as e: fail(context, grpc.StatusCode.INVALID_ARGUMENT, e)
      except MemoryError as e: fail(context, grpc.StatusCode.RESOURCE_EXHAUSTED, e)
      except RuntimeError as e:
        # tinygrad reports device allocation failures as RuntimeError/MemoryError with "out of memory"
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if "memory" in str(e).lower() else grpc.StatusCode.INTERNAL
        fail(context, code, e)
      except Exception as e:  # noqa: BLE001 - a bug in the worker: egpud sees INTERNAL
        fail(context, grpc.StatusCode.INTERNAL, e)
    return call

  class Servicer(pb_grpc.WorkerServicer):
    def Hello(self, request, context):
      return pb.HelloResponse(device=device_msg, protocol_version=PROTOCOL_VERSION, pid=os.getpid())

    def Ping(self, request, context):
      return pb.PingResponse(allocated_bytes=figures["allocated"], cached_bytes=figures["cached"],
                             memory_free_bytes=figures["free"], models=len(models))

    @guarded
    def Load(self, request, context):
      if request.slots == 0 or request.context == 0: raise ValueError("context and slots must be at least 1")
      start = time.perf_counter()

      if not request.config_json: raise ValueError("Load needs config_json (the engine's configuration of the model)")
      config = Config.from_engine(json.loads(request.config_json))

      def load():
        maybe_stall("Load")
        maybe_hold_load()
        model = load_model(request.path, ctx=request.context, slots=request.slots, config=config)
        publish(with_free=True)
        return model
      model = on_device(load)
      model_id = next(ids)
      models[model_id] = model
      print(f"egpu-worker: loaded {request.path} as model {model_id} ({model.memory_bytes()} bytes)",
            file=sys.stderr, flush=True)
      return pb.LoadResponse(model_id=model_id, bytes=model.memory_bytes(), n_vocab=model.cfg.n_vocab,
                             seconds=time.perf_counter() - start)

    @guarded
    def Unload(self, request, context):
      model = models.pop(request.model_id, None)
      if model is None: raise FileNotFoundError(f"no model with id {request.model_id}")
      before = model.memory_bytes()

      def unload(model):
        maybe_stall("Unload")
        model.close()
        del model
        gc.collect()
        Device[dev].synchronize()
        Device[dev].allocator.free_cache()
        publish(with_free=True)
      on_device(unload, model)
      del model
      return pb.UnloadResponse(bytes_freed=before, allocated_bytes=figures["allocated"])

    @guarded
    def Step(self, request, context):
      start = time.perf_counter()
      model = models.get(request.model_id)
      if model is None: raise FileNotFoundError(f"no model with id {request.model_id}")
      items = [StepItem(slot=i.slot, start_pos=i.start_pos, tokens=list(i.tokens), logits=logits_kind[i.logits])
               for i in request.items]
      def step():
        maybe_stall("Step")
        out = model.step(items, hidden=request.hidden)
        publish(with_free=False)  # the driver's free figure can cost a call; refreshed on load/unload
        return out
      out = on_device(step)
      reply = pb.StepResponse(n_vocab=model.cfg.n_embd if request.hidden else model.cfg.n_vocab)
      for arr in out:
        if arr is None:
          reply.items.add(rows=0)
        else:
          arr = np.ascontiguousarray(arr, dtype="<f4")
          reply.items.add(rows=1 if arr.ndim == 1 else arr.shape[0], values=arr.tobytes())
      reply.seconds = time.perf_counter() - start
      reply.bytes = model.memory_bytes()
      return reply

    @guarded
    def CopyPrefix(self, request, context):
      model = models.get(request.model_id)
      if model is None: raise FileNotFoundError(f"no model with id {request.model_id}")
      def copy():
        model.copy_prefix(int(request.from_slot), int(request.to_slot), int(request.positions))
        publish(with_free=False)
      on_device(copy)
      return pb.CopyPrefixResponse(bytes=model.memory_bytes())

  server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[
    ("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)])
  pb_grpc.add_WorkerServicer_to_server(Servicer(), server)
  if server.add_insecure_port(f"unix:{args.socket}") == 0:
    print(f"egpu-worker: cannot listen on {args.socket}", file=sys.stderr, flush=True)
    return 2
  server.start()
  print(f"egpu-worker: serving {dev} ({device_msg.name or device_msg.arch}) on {args.socket}", file=sys.stderr, flush=True)
  print("egpu-worker ready", flush=True)
  # egpud holds our stdin; end of file means it is gone (even if it was SIGKILLed).
  sys.stdin.buffer.read()
  server.stop(grace=None)
  # Not a normal return: interpreter exit joins the device thread, and a device thread stuck in
  # the driver would then keep this process, and the device, forever after egpud is gone.
  sys.stdout.flush(); sys.stderr.flush()
  os._exit(0)


if __name__ == "__main__":
  sys.exit(main())
