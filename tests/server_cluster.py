"""`objcache server` processes on loopback for tests: a cluster of real
server processes over a real S3 server (moto or Ceph RGW)."""
import os
import signal
import subprocess
import sys

from objcache.client.cluster import ClusterClient
from objcache.testing.processes import stop_processes
from objcache.testing.s3servers import free_port

SECRET = "server-process-test-secret"


class Cluster:
    def __init__(self, tmp_path, s3, bucket, n=3, chunk="1MiB", replicas=1,
                 prefix="pre", cache="64MiB", writeback_delay=0.2):
        self.procs = []
        self.argvs = []
        self.ports = []
        self.tmp_path, self.s3_server, self.bucket_url = tmp_path, s3, f"s3://{bucket}/{prefix}"
        self.chunk, self.replicas, self.cache = chunk, replicas, cache
        self.writeback_delay = writeback_delay
        self.env = dict(os.environ, OBJCACHE_SECRET=SECRET, AWS_ACCESS_KEY_ID=s3.access_key,
                        AWS_SECRET_ACCESS_KEY=s3.secret_key, AWS_DEFAULT_REGION="us-east-1")
        for _ in range(n):
            self.add_node()

    def add_node(self):
        """Start one more node (the first bootstraps, the others join it)."""
        i, port = len(self.ports), free_port()
        argv = [sys.executable, "-m", "objcache", "server", "--data-dir",
                str(self.tmp_path / f"node{i}"), "--listen", f"127.0.0.1:{port}",
                "--bucket", self.bucket_url, "--endpoint-url", self.s3_server.endpoint_url,
                "--cache-size", self.cache, "--chunk-size", self.chunk,
                "--writeback-delay", str(self.writeback_delay),
                "--replicas", str(self.replicas)]
        if i:
            argv += ["--join", f"127.0.0.1:{self.ports[0]}"]
        try:
            self.procs.append(self._spawn(argv))
        except BaseException:
            self.stop()                     # the nodes already started must not outlive the test
            raise
        self.ports.append(port)
        self.argvs.append(argv)
        self.addrs = ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def _spawn(self, argv):
        """Start a server; returns once it prints "serving" (it is a full
        member then)."""
        # Each server's log goes to a file next to its data directory (an
        # unread pipe could fill up and stall the server).
        log_path = argv[argv.index("--data-dir") + 1] + ".log"
        with open(log_path, "ab") as log_file:
            p = subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stderr=log_file,
                                 text=True)
        line = p.stdout.readline()
        if p.poll() is not None:
            with open(log_path) as f:
                raise AssertionError(f"server did not start: {line}\n{f.read()[-3000:]}")
        assert "serving" in line, line
        return p

    def kill9(self, i):
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait()

    def restart(self, i):
        """Start node ``i`` again with its data directory and port."""
        self.procs[i] = self._spawn(self.argvs[i])

    def client(self):
        return ClusterClient(self.addrs, SECRET.encode())

    def stop(self):
        stop_processes(self.procs, timeout=20)
