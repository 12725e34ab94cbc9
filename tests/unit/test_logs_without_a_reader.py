"""A service whose log pipe lost its reader (`redrive up` killed -9) goes on, logs dropped:
a BrokenPipeError from a log line must not cut its graceful shutdown short."""

import subprocess
import sys

CHILD = """
import sys
import structlog
from shared.logging import configure_logging
from shared.settings import Settings
configure_logging(Settings(), "test")
structlog.get_logger("t").info("before")
sys.stdin.readline()  # the parent closes our stderr's read end meanwhile
for i in range(2000):
    structlog.get_logger("t").info("after", i=i, pad="x" * 100)
import logging
logging.getLogger("plain").warning("stdlib too")
print("finished", flush=True)
"""


def test_logging_into_a_pipe_nobody_reads_does_not_stop_the_process():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert "before" in child.stderr.readline()
    child.stderr.close()
    out, _ = child.communicate("go\n", timeout=60)
    assert out.strip() == "finished" and child.returncode == 0
