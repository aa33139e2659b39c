"""A stand-in rank for the launcher test: rank 1 kills itself (SIGKILL) at once, the others wait 60 s (as a rank
blocked in a collective would)."""
import os
import signal
import time

if os.environ["RANK"] == "1":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(60)
