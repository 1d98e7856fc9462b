"""A script that starts a local cluster without ``if __name__ == "__main__":`` fails at once with
the remedy (issue 17 item 3); it used to wait ``wait_timeout`` for workers that died importing it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from chunkglm.cluster.main_guard import inside_main_guard

SOURCE = textwrap.dedent('''\
    import chunkglm.cluster

    client = chunkglm.cluster.start("local")


    def main():
        return chunkglm.cluster.start("local")


    if __name__ == "__main__":
        main()
        if True:
            chunkglm.cluster.start("local")
    else:
        chunkglm.cluster.start("local")
    if "__main__" == __name__:
        main()
    ''')


@pytest.mark.parametrize("line, guarded", [(3, False), (7, False), (11, True), (13, True), (15, False), (17, True)])
def test_which_lines_run_only_under_the_guard(line, guarded):
    assert inside_main_guard(SOURCE, line) is guarded


def _script(tmp_path, body):
    path = tmp_path / "analysis.py"
    path.write_text(textwrap.dedent(body))
    env = {**os.environ, "CHUNKGLM_CLUSTER__LOCAL__N_WORKERS": "1",
           "CHUNKGLM_CLUSTER__LOCAL__DASHBOARD_ADDRESS": "127.0.0.1:0"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    return done, time.perf_counter() - start


def test_a_script_without_the_guard_fails_at_once_with_the_remedy(tmp_path):
    done, seconds = _script(tmp_path, '''\
        import chunkglm.cluster

        def run():
            return chunkglm.cluster.start("local")

        client = run()
        print("started")
        ''')
    assert done.returncode != 0 and "started" not in done.stdout
    assert "ClusterStartError: a local cluster is started at the top level of" in done.stderr
    assert "analysis.py (line 6)" in done.stderr and 'if __name__ == "__main__":' in done.stderr
    assert seconds < 60  # at once, before any worker process starts


def test_the_same_script_with_the_guard_starts_its_cluster(tmp_path):
    done, _ = _script(tmp_path, '''\
        import chunkglm.cluster

        def run():
            return chunkglm.cluster.start("local")

        if __name__ == "__main__":
            with run() as client:
                print("started", len(client.scheduler_info()["workers"]))
        ''')
    assert done.returncode == 0, done.stderr
    assert "started 1" in done.stdout
