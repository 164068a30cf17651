import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PIPELINE_TRACKING", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real servers, whole pipelines, training runs (CI runs them)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skips without one)")
    config.addinivalue_line("markers", "docker: needs a Docker engine (`make test` starts one: infra/ensure_docker.sh)")


IMAGE_TAG = os.environ.get("LIVETHINKING_IMAGE_TAG", "dev")


def pytest_collection_modifyitems(config, items):
    """Docker tests last: `make test` builds their images in the background meanwhile. Before
    them, the tests of the session's vLLM server, one after another (it lives until the end)."""
    items.sort(key=lambda item: (item.get_closest_marker("docker") is not None,
                                 "vllm_server" in getattr(item, "fixturenames", ())))


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """One finished micro run of the main job (`dvc repro`, tracking on), shared by the tests that
    start from a finished pipeline and leave its outputs as they are (serving the champion, a DVC
    remote round trip): each would otherwise pay for the same run again. Returns (workspace, env);
    copy env before changing it."""
    from tests.helpers import dvc, pipeline_workspace

    ws = tmp_path_factory.mktemp("micro_run")
    env = pipeline_workspace(ws)
    _, seconds = dvc(ws, env, "repro")
    print(f"\nmicro pipeline: {seconds:.1f} s")
    return ws, env


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """One vLLM OpenAI-compatible server (tests/test_vllm.py: start_server) for every test that
    needs one: starting it costs about 30 s, and idle it uses no CPU (0.4 CPU-seconds in 20 s,
    measured). pytest_collection_modifyitems runs its tests together."""
    from tests.test_vllm import start_server

    yield from start_server(tmp_path_factory.mktemp("vllm_server"))


@pytest.fixture
def shared_data() -> Path:
    """The real public data samples; skipped cleanly in a clone without ../shared."""
    if not SHARED.exists():
        pytest.skip("../shared/data is not present in this checkout")
    return SHARED


@pytest.fixture
def musique_example() -> dict:
    return {"id": "2hop__1", "dataset": "musique",
            "documents": ["zono works in dakasu .", "dadada is a city in kestria .", "zono was born in dadada .",
                          "dakasu is a city in sarnia ."],
            "history": [], "question": "in which country was zono born ?", "answers": ["kestria"],
            "gold_doc_idxs": [1, 2], "helpful_doc_idxs": [2], "bridge": ["dadada"], "hops": 2}


@pytest.fixture
def ecommerce_example() -> dict:
    return {"id": "e1", "dataset": "ecommerce",
            "documents": ["the tolka lamp is green .", "the vimbo lamp is red .", "the tolka lamp is made of glass ."],
            "history": [{"role": "user", "content": "the tolka lamp ."}], "question": "what color is it ?",
            "answers": ["the tolka lamp is green ."], "gold_doc_idxs": [0], "helpful_doc_idxs": [2], "bridge": [], "hops": 1}


@pytest.fixture
def serve():
    """Start scripted OpenAI-protocol servers (tests/openai_fake_server.py); all stop at teardown."""
    from tests.openai_fake_server import FakeOpenAIServer
    servers: list[FakeOpenAIServer] = []

    def start(**kw) -> FakeOpenAIServer:
        servers.append(FakeOpenAIServer(**kw).start())
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def serve_process():
    """Start the scripted server in processes of their own, which a test can SIGKILL mid-run
    (tests/openai_fake_server.py: FakeServerProcess); all killed at teardown."""
    from tests.openai_fake_server import FakeServerProcess
    procs: list[FakeServerProcess] = []

    def start(**kw) -> FakeServerProcess:
        procs.append(FakeServerProcess(**kw))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()


@pytest.fixture(scope="session")
def engine():
    """A Docker client; infra/ensure_docker.sh installs and starts the engine where it can (root)."""
    docker = pytest.importorskip("docker")
    proc = subprocess.run([str(ROOT / "infra" / "ensure_docker.sh")], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if os.geteuid() != 0:
            pytest.skip(f"no Docker engine, and only root can provide one: {proc.stderr.strip()}")
        pytest.fail(f"infra/ensure_docker.sh could not provide a Docker engine:\n{proc.stdout}{proc.stderr}")
    return docker.from_env()


@pytest.fixture(scope="session")
def images(engine, tmp_path_factory):
    """livethinking/{light,train,vllm}:TAG, built from the working tree (or waited for, when
    `make test` is building them in the background: build_images.sh takes a lock)."""
    from flows.docker_runner import FAMILIES

    if os.geteuid() != 0 and not engine.images.list(name="livethinking/debian-base"):
        pytest.skip("the Debian base image is built with debootstrap, which needs root (infra/make_base_image.sh)")
    log = tmp_path_factory.mktemp("build") / "build.log"
    with log.open("w") as f:
        proc = subprocess.run([str(ROOT / "infra" / "build_images.sh"), *FAMILIES], cwd=ROOT,
                              env={**os.environ, "TAG": IMAGE_TAG, "PYTHON": sys.executable},
                              stdout=f, stderr=subprocess.STDOUT, timeout=3600)
    text = log.read_text()
    assert proc.returncode == 0, text[-5000:]
    print("\n".join(line for line in text.splitlines() if " built in " in line))
    return {family: f"livethinking/{family}:{IMAGE_TAG}" for family in FAMILIES}
