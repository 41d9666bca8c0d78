import os

from egpu_worker.env import default_cache_env

# The tests are meant for DEV=CPU (needs clang); another DEV from the environment is respected.
os.environ.setdefault("DEV", "CPU")
default_cache_env()
