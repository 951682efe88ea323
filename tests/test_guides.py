"""Every command and snippet of README.md and the component guides runs here, extracted from the Markdown.

Blocks of one guide run in document order in one working directory (a scratch directory holding copies of the
repository's ``*/examples`` folders), like a reader typing them: Python blocks share one namespace, shell blocks
one environment. Placeholders (``s3://bucket``, ``RUN_ID``, ports) and sizes are filled and scaled by the
``<!-- guide: ... -->`` comment above a block (tests/guides.py). A block that cannot run here is listed in
`NOT_RUN` with the reason, a command in `NOT_RUN_COMMANDS`; a new block that is neither run nor listed fails
`test_every_block_runs_or_is_listed`.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shlex
import shutil
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.cli import bench_app
from raytwin.cli import app
from raytwin.ports import free_port
from tests.fixtures_cluster import CRD_DIR
from tests.fixtures_cluster_kube import FakeKubeApi
from tests.guides import GUIDES, REPO_ROOT, Block, Shell, all_blocks, extract, fill, shell_commands

NOT_RUN: dict[tuple[str, str], str] = {  # (guide, first line of the block) -> why it does not run here
    ("README.md", "flowchart LR"): "a Mermaid diagram",
    ("examples/dcmotor/README.md", '[project.entry-points."raytwin.models"]'): "the example package's own "
     "pyproject.toml holds it; tests/test_example_dcmotor.py checks that the installed package is found by it",
    ("README.md", '[project.entry-points."raytwin.models"]'): "a pyproject.toml fragment: tests/test_models.py "
     "declares a model in that entry-point group of an installed distribution and finds it by name",
    ("actors/README.md", "log/tenant=T/date=D/seg-<uuid>.arrows                   accepted events (asset_id column, "
     "values in the type's units): on local disk, a shard's appended Arrow IPC stream"): "the store's file layout, not a command",
    ("cluster/README.md", "kubectl -n raytwin create secret generic raytwin-gpu-ray-token "
     "--from-literal=auth_token=\"$(openssl rand -base64 32)\""): "needs a Kubernetes cluster running KubeRay; "
     "tests/test_cluster_security.py checks that the rendered pods and RayJob submitters take the token from "
     "that Secret",
    ("cluster/README.md", "raytwin cluster render new-spec.yaml --kind rayservice -o rayservice.yaml     # refused "
     "here, not half-way"): "needs a Kubernetes cluster running KubeRay (`kubectl wait` on its pods); render, "
     "apply, status and delete run against a fake API server in this guide's \"Render and apply\" block",
    ("cluster/README.md", "apiVersion: batch/v1"): "a Kubernetes CronJob (needs an API server with the batch "
     "API); its command, `raytwin twins compact`, runs in actors/README.md's CLI block",
    ("cluster/README.md", "raytwin cluster up --local [--workers 1] [--cpus-per-node 1] [--object-store-mb 100]"):
        "the synopsis of the local cluster's commands: `cluster up --local --workers 1` and `cluster down --local` run "
        "in \"A sweep as a Ray job on the local cluster\" below, where the printed addresses are checked",
    ("cluster/README.md", "raytwin job submit [--address http://HOST:8265] [--working-dir .] [--exclude PATTERN] "
     "[-e KEY=VALUE] [--id ID] -- raytwin sweep ..."): "the synopsis of the job commands; each runs with real "
     "arguments in the next block, \"A sweep as a Ray job on the local cluster\", but `job stop` "
     "(tests/test_cluster_local.py stops a running sweep job with it)",
    ("serve_apps/README.md", "serve run serve_apps.app:build_app store_url=s3://bucket/raytwin "
     "keys_file=/etc/raytwin/keys.json"): "Ray's own `serve run` blocks in the foreground with its own Ray; the "
     "same application is started by `raytwin serve` in the quick start above, and its arguments are "
     "ServeConfig's fields (tests/test_serve_units.py)",
    ("serve_apps/README.md", "# RayService spec.serveConfigV2 (rendered by cluster/)"): "a fragment of a "
     "RayService manifest: `raytwin cluster render --kind rayservice` (cluster/README.md) renders and validates "
     "the whole manifest",
    ("serve_apps/README.md", '{"error": {"code": "not_found", "message": "asset zone-9 not found", "details": [], '
     '"request_id": "5f1c..."}}'): "an example error body; tests/test_serve_api.py asserts this shape on every "
     "error it provokes",
    ("serve_apps/README.md", "HTTP -> Serve proxy -> Ingress (FastAPI, autoscaled, stateless)"): "a diagram",
    ("serve_apps/README.md", '{"model_packages": {"*": ["plant_models"], "globex": ["globex_models"]}}'): "a "
     "ServeConfig fragment (`--config` file): tests/test_serve_units.py builds the API with model_packages and "
     "checks what it imports and refuses",
    ("serve_apps/README.md", "id: 42-3fa9c2d1"): "the change stream's wire format; tests/test_serve_api.py reads it",
    ("client/README.md", "from client import RayTwinClient"): "needs a running API: tests/test_serve_api.py runs "
     "it against its server",
    ("client/README.md", "from datetime import UTC, datetime"): "needs a running API: tests/test_client.py runs it "
     "against the in-process app",
    ("client/README.md", "import os"): "needs a running API: tests/test_client.py runs it against the in-process app",
    ("cluster/README.md", "raytwin cluster up --local --workers 1"): "each step runs elsewhere on the same "
     "commands, a second two-node cluster here would cost a minute of CI: `cluster up --local`/`down` in "
     "tests/test_cluster_local_cli.py, `job submit --working-dir . -- raytwin sweep run ...` to its end with "
     "`job status` and `job logs` in tests/test_cluster_sweep.py, `job logs --follow` in tests/test_cluster_local.py",
    ("cluster/README.md", "from cluster.jobs import JobClient"): "each call runs on a cluster of its own elsewhere, a "
     "third one here would cost CI 10-20 s: the shared two-node cluster of the cluster tests is this very "
     "`with LocalCluster(num_workers=1, cpus_per_node=1)` (tests/conftest.py), whose jobs tests/test_cluster_local.py "
     "lists with `raytwin job list` (`JobClient.list`), as tests/test_cluster_local_cli.py does on the head node "
     "`cluster up --local --workers 0` starts",
    ("sweeps/README.md", "raytwin recommend ask pump-1 request.json            # from the twin's live state; prints "
     "the recommendation's id"): "needs a running API, a connector and a second key: "
     "tests/test_serve_recommend.py runs these commands against the in-process app over HTTP",
    ("benchmarks/README.md", '{"machine": {"date_utc", "cpu_model", "cpu_count", "memory_gib", '
     '"load_average_1_5_15", "jax_devices",'): "an outline of the JSON record's keys, not a record; the record "
     "is written and read back by `run` and `report` in the block above",
}
NOT_RUN_COMMANDS: dict[str, str] = {  # whole command (without its comment) -> why it does not run here
    "./dev demo": "the demo runs at small sizes in tests/test_cli.py::test_demo_runs_the_whole_loop",
    "./dev test": "the test suite itself: CI runs `./dev test`",
    "python -m benchmarks run": "every benchmark at full size (over an hour); tests/test_benchmarks.py runs each "
                                "product path with --quick (the service-level runs such as failover, overload "
                                "and closed-loop are covered by the tests of what they measure)",
    "python -m benchmarks run --quick": "tests/test_benchmarks.py runs the product paths with --quick "
                                        "(test_bench_cli_quick_*, test_bench_quick_*); running them again here "
                                        "would double the cost in CI",
    "pip install -e examples/dcmotor": "installs into the environment running the tests; ./dev installs the "
                                       "example package with RayTwin",
    'raytwin job submit --working-dir . --py-module examples/dcmotor/raytwin_dcmotor -- raytwin sweep run '
    '"$PWD/spec.json" --runs "$PWD/runs"': "needs a running cluster's job API; tests/test_cluster_local.py submits "
                                           "the same job to the local two-node cluster",
    'raytwin job submit --working-dir . -- raytwin sweep run "$PWD/out/spec.json" --runs s3://bucket/runs':
        "needs a running cluster's job API; the same submission runs on a local cluster in cluster/README.md's "
        "job block",
}
CAPTURES: dict[str, tuple[str, str]] = {  # command prefix -> (name, regex on its output): values later commands use
    "raytwin sweep run": ("run_id", r"^run (\S+):"),
    "raytwin keys create": ("key", r"^(rtk_\S+)$"),
    "raytwin job submit": ("job_id", r"^(\S+)\s*\Z"),
}
CALIB_EXAMPLE = yaml.safe_load((REPO_ROOT / "sweeps/examples/calib.yaml").read_text())
EXPECTED: dict[str, str] = {  # command prefix -> text its output must contain, as the guide's comment says
    # the example CalibrationSpec starts where the synthetic data it fits starts, as the command prints
    "raytwin calibrate synthetic thermal_rc": f"start_state: {json.dumps(CALIB_EXAMPLE['start_state'])}",
    "raytwin rerun": "identical: ",
    "raytwin job status": "SUCCEEDED",
    "raytwin cluster up --local": "Ray address:   127.0.0.1:",
    "raytwin sweep run": " scenarios in ",
    "raytwin job logs": " scenarios in ",
    # the RayCluster's NetworkPolicy is owned by it, so Kubernetes deletes it too
    "raytwin cluster delete raytwin-gpu": "NetworkPolicy raytwin/raytwin-gpu-raytwin deleted with it by Kubernetes' "
                                          "garbage collector (owned by RayCluster raytwin/raytwin-gpu)",
}
SHELL, PYTHON, FILE = ("bash", "sh"), ("python",), ("yaml", "json")
APPS = {("raytwin",): app, ("./dev",): app, ("python", "-m", "benchmarks"): bench_app}


def _listing(command: str) -> str | None:
    """The `NOT_RUN_COMMANDS` entry that names `command`, if any."""
    words = shlex.split(command, comments=True)
    return next((listed for listed in NOT_RUN_COMMANDS if shlex.split(listed) == words), None)


def _runs(block: Block) -> bool:
    if (block.guide, block.first_line) in NOT_RUN:
        return False
    return block.lang in SHELL + PYTHON or (block.lang in FILE and block.file is not None)


def test_every_block_runs_or_is_listed() -> None:
    """A new block must run here or be listed with its reason; a listing that names no block is stale."""
    blocks = all_blocks()
    listed = {(block.guide, block.first_line) for block in blocks if (block.guide, block.first_line) in NOT_RUN}
    unhandled = [block.id for block in blocks if not _runs(block) and (block.guide, block.first_line) not in listed]
    assert unhandled == [], f"blocks neither run by {__name__} nor listed in NOT_RUN: {unhandled}"
    assert set(NOT_RUN) - listed == set(), "NOT_RUN names blocks that no longer exist"
    commands = [command for block in blocks if block.lang in SHELL for command in shell_commands(block.text)]
    stale = set(NOT_RUN_COMMANDS) - {_listing(command) for command in commands}
    assert stale == set(), f"NOT_RUN_COMMANDS names commands that no longer exist: {stale}"


def test_blocks_are_found_in_every_guide() -> None:
    assert {block.guide for block in all_blocks()} == set(GUIDES)


def test_printed_sweeps_fit_the_size_limit_of_sweep_run() -> None:
    """A guide's sweep is scaled down to run here (`--n 1000000 => --n 512`), which hid that `raytwin sweep run`
    refused the printed 1e6-scenario week (1.008e10 scenario-steps) by its default `--max-work`."""
    from raytwin.contracts import MAX_RUN_WORK
    from raytwin.models_cli import resolve_model
    from sweeps.kits import example_sweep, kit_for

    checked = 0
    for block in (block for block in all_blocks() if block.lang in SHELL):
        words = [shlex.split(command, comments=True) for command in shell_commands(block.text)]
        examples = [w for w in words if w[:3] == ["raytwin", "sweep", "example"] and "--n" in w]
        for example, run in zip(examples, (w for w in words if w[:3] == ["raytwin", "sweep", "run"])):
            sweep = example_sweep(kit_for(resolve_model(example[3])))
            work = int(example[example.index("--n") + 1]) * round(sweep.horizon_s / sweep.step_s)
            limit = int(run[run.index("--max-work") + 1]) if "--max-work" in run else MAX_RUN_WORK
            assert work <= limit, f"{block.id}: {work:.3g} scenario-steps, over --max-work {limit:.3g}"
            checked += 1
    assert checked >= 2  # sweeps/README.md's CLI block and cluster/README.md's job


def test_extractor_applies_directives_and_joins_commands(tmp_path: Path) -> None:
    (tmp_path / "guide.md").write_text(textwrap.dedent("""\
        Some prose.

        <!-- guide: s3://bucket => {s3} ; RUN_ID => {run_id}
             --n 1000000 => --n 8 -->
        ```bash
        raytwin sweep example thermal_rc --n 1000000 > spec.json   # a comment
        raytwin rerun RUN_ID \\
            --runs s3://bucket/runs
        curl -d '{"events":
          []}' localhost
        ```

        <!-- guide: file=spec.yaml -->
        ```yaml
        name: x
        ```
        ```python
        print({"a": 1})
        ```
        """))
    shell, spec, python = extract("guide.md", root=tmp_path)
    assert (shell.line, shell.lang, spec.file, python.substitutions) == (5, "bash", "spec.yaml", ())
    context = {"s3": "s3://guides", "run_id": "sweep-1"}
    commands = [fill(command, context).strip() for command in shell_commands(shell.prepared())]
    assert commands == ["raytwin sweep example thermal_rc --n 8 > spec.json   # a comment",
                        "raytwin rerun sweep-1      --runs s3://guides/runs",
                        "curl -d '{\"events\":\n  []}' localhost"]
    assert fill(python.prepared(), context) == 'print({"a": 1})'  # the code's own braces are left alone
    with pytest.raises(AssertionError, match="no value yet"):
        fill(shell.prepared(), {})
    stale = Block("guide.md", 1, "bash", "raytwin version", (("RUN_ID", "{run_id}"),))
    with pytest.raises(AssertionError, match="matches nothing"):
        stale.prepared()


def test_listed_commands_match_whole_commands_only() -> None:
    assert _listing("./dev demo    # the whole loop") == "./dev demo"
    assert _listing("./dev demo --scenarios 10") is None
    assert _listing("python -m benchmarks run   # everything") == "python -m benchmarks run"
    assert _listing("python -m benchmarks run sweep") is None
    submit = 'raytwin job submit --working-dir . -- raytwin sweep run "$PWD/out/spec.json" --runs s3://bucket/runs'
    assert _listing(submit.replace('"', "'")) == submit  # quoting does not matter, the words do


@dataclass
class Guide:
    """One guide's run: its working directory, Python namespace, shell and placeholder values."""

    workdir: Path
    shell: Shell
    context: dict[str, Any]
    namespace: dict[str, Any] = field(default_factory=dict)
    cleanups: list[Callable[[], object]] = field(default_factory=list)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _file_server(root: Path) -> Iterator[str]:
    """Plain HTTP over `root` on loopback: the NDJSON gateway the actors guide streams from."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def guides(ray_session, s3_endpoint, tmp_path_factory) -> Iterator[dict[str, Guide]]:
    """Each guide's run, created on its first block; clean-ups (services, Serve, clusters) run at the end."""
    import s3fs

    bucket = "s3://guides"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True).mkdir("guides")
    with contextlib.ExitStack() as stack:
        kube = stack.enter_context(FakeKubeApi())
        kubeconfig = tmp_path_factory.mktemp("kube") / "config"
        # the kubernetes client reads $KUBECONFIG when it is imported; a shell's `raytwin` starts with it set
        stack.enter_context(pytest.MonkeyPatch.context()).setattr(
            "kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": kube.url}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "users": [{"name": "fake", "user": {"token": "t"}}],
        }))

        def make(guide: str) -> Guide:
            workdir = tmp_path_factory.mktemp(guide.replace("/", "-"))
            for examples in REPO_ROOT.glob("*/examples"):
                shutil.copytree(examples, workdir / examples.relative_to(REPO_ROOT))
            http_url = stack.enter_context(_file_server(workdir))
            env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "PYTEST_CURRENT_TEST")}
            env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO_ROOT),
                       PWD=str(workdir), KUBECONFIG=str(kubeconfig),
                       RAYTWIN_LOCAL_CLUSTER_STATE=str(workdir / "local-cluster.json"))
            context = {"s3": f"{bucket}/{guide.replace('/', '-')}", "http": http_url, "port": free_port(),
                       "crds": CRD_DIR, "repo": REPO_ROOT, "workdir": workdir}
            return Guide(workdir, Shell(workdir, env, APPS), context)

        class Runs(dict):
            def __missing__(self, guide: str) -> Guide:
                self[guide] = made = make(guide)
                return made

        runs = Runs()
        try:
            yield runs
        finally:
            for run in runs.values():
                for cleanup in reversed(run.cleanups):
                    with contextlib.suppress(Exception):
                        cleanup()


def _run_shell(guide: Guide, block: Block) -> None:
    for raw in shell_commands(block.prepared()):
        command = fill(raw, guide.context).strip()
        if _listing(command) is not None:
            continue
        if command.startswith("curl "):  # curl exits 0 on HTTP errors: have it print the status too
            command += " --write-out '\nHTTP %{http_code}'"
        result = guide.shell.run(command)
        assert result.exit_code == 0, f"{block.id}: `{command}` exited {result.exit_code}:\n{result.output[-3000:]}"
        status = re.search(r"\nHTTP (\d+)\Z", result.output)
        assert status is None or int(status.group(1)) < 400, f"{block.id}: `{command}` answered:\n{result.output}"
        for prefix, expected in EXPECTED.items():
            if command.startswith(prefix):
                assert expected in result.output, f"{block.id}: `{command}` printed:\n{result.output[-3000:]}"
        for prefix, (name, pattern) in CAPTURES.items():
            if command.startswith(prefix):
                found = re.search(pattern, result.output.strip(), re.M)
                assert found, f"{block.id}: `{command}` printed no {name}:\n{result.output[-3000:]}"
                guide.context[name] = found.group(1)
        for prefix, hook in AFTER_COMMAND.items():
            if command.startswith(prefix):
                hook(guide)


def _run_python(guide: Guide, block: Block) -> None:
    code = fill(block.prepared(), guide.context)
    cwd = Path.cwd()
    os.chdir(guide.workdir)
    try:
        exec(compile(code, block.id, "exec"), guide.namespace)  # noqa: S102 - the guide's own snippet
    finally:
        os.chdir(cwd)


# --- what a guide's snippets take from their surroundings ------------------------------------------------------

def _stop_serve(guide: Guide) -> None:
    from ray import serve

    guide.cleanups.append(serve.shutdown)


def _stop_local_cluster(guide: Guide) -> None:
    from cluster.local import LocalClusterInfo, stop_local_cluster

    state = guide.workdir / "local-cluster.json"
    if state.exists():
        info = LocalClusterInfo.load(state)
        guide.cleanups.append(lambda: stop_local_cluster(info))


AFTER_COMMAND: dict[str, Callable[[Guide], None]] = {  # command prefix -> what it leaves running, to stop at the end
    "raytwin serve": _stop_serve,
    "raytwin cluster up": _stop_local_cluster,
}


def _closes_twins(guide: Guide) -> None:
    """Twin services a snippet left open are closed at the end (a snippet that closes its own is not harmed)."""
    from actors import TwinService

    for value in guide.namespace.values():
        if isinstance(value, TwinService) and value.close not in guide.cleanups:
            guide.cleanups.append(value.close)


def _printed_ingest_report(guide: Guide, block: Block) -> None:
    """The report the actors guide prints in a comment is the one the snippet gets."""
    printed = re.search(r"# (IngestReport\(.*?\))", block.text)
    assert printed and repr(guide.namespace["report"]) == printed.group(1)


def _live_zone_17(guide: Guide, block: Block) -> None:
    """`service`: a live twin service in which tenant acme's zone-17 runs the registry's zone-17@1.2.0, with one
    telemetry event applied (a twin without any has no live state to start from)."""
    from datetime import UTC, datetime

    from actors import TwinService
    from raytwin.contracts import Asset, TelemetryEvent
    from raytwin.registry import ModelRegistry

    store = guide.context["s3"]
    service = TwinService(f"{store}/twins", shards=1)
    guide.cleanups.append(service.close)
    service.register(Asset(id="zone-17", tenant="acme", type_name="thermal_rc", type_version="1.0.0"),
                     ModelRegistry(f"{store}/models").get("zone-17@1.2.0"), initial_state={"T_in": 293.4, "T_m": 291.0})
    event = TelemetryEvent(asset_id="zone-17", event_time=datetime(2026, 12, 1, 8, tzinfo=UTC), sequence=1,
                           measurements={"T_in": {"value": 293.5, "unit": "K"}})
    assert service.ingest("acme", [event]).accepted == 1
    guide.namespace["service"] = service


def _zone_17_telemetry(guide: Guide, block: Block) -> None:
    """The month of zone-17 telemetry the calibration snippet reads: 12 h of synthetic data from its start state."""
    import pyarrow.parquet as pq

    from raytwin.storage import filesystem
    from sweeps.synthetic import synthetic_telemetry

    table = synthetic_telemetry("thermal_rc", {"C_in": 2.2e6}, {"T_in": 293.15, "T_m": 291.15}, 720, 60.0,
                                {"T_in": 0.05})
    fs, path = filesystem(f"{guide.context['s3']}/data/zone-17")
    pq.write_table(table, f"{path}/2026-11.parquet", filesystem=fs)


def _close_zone_17(guide: Guide, block: Block) -> None:
    guide.namespace.pop("service").close()  # its shard actors' names are free again for the Serve guide's twins


def _leaves_the_checkout_clean(guide: Guide, block: Block) -> None:
    """Followed from the repository root, the sweeps guide's CLI section left its spec.json and zone-17.parquet there,
    untracked files in the checkout: what the guide has written by then is in folders .gitignore ignores."""
    ignored = {line.strip("/") for line in (REPO_ROOT / ".gitignore").read_text().splitlines()
               if line.startswith("/") and line.endswith("/")}
    copied = {examples.relative_to(REPO_ROOT).parts[0] for examples in REPO_ROOT.glob("*/examples")}
    written = {path.name for path in guide.workdir.iterdir()} - copied
    assert written <= ignored, f"{block.id} left {sorted(written - ignored)} in the checkout, not ignored by git"


BEFORE_BLOCK: dict[tuple[str, str], Callable[[Guide, Block], None]] = {
    ("sweeps/README.md", "from sweeps.twins import start_from_twin"): _live_zone_17,
    ("sweeps/README.md", "from sweeps.calibration import CalibrationSpec"): _zone_17_telemetry,
}
AFTER_BLOCK: dict[tuple[str, str], Callable[[Guide, Block], None]] = {
    ("sweeps/README.md", "from sweeps.twins import start_from_twin"): _close_zone_17,
    ("sweeps/README.md", "mkdir -p out"): _leaves_the_checkout_clean,
    ("actors/README.md", "from datetime import UTC, datetime"): _printed_ingest_report,
}


def _blocks_to_run() -> list[Block]:
    return [block for block in all_blocks() if _runs(block)]


@pytest.mark.parametrize("block", _blocks_to_run(), ids=lambda block: block.id)
def test_guide_block_runs_as_printed(block: Block, guides: dict[str, Guide]) -> None:
    guide = guides[block.guide]
    key = (block.guide, block.first_line)
    if key in BEFORE_BLOCK:
        BEFORE_BLOCK[key](guide, block)
    if block.file is not None:
        (guide.workdir / block.file).write_text(fill(block.prepared(), guide.context) + "\n")
    elif block.lang in SHELL:
        _run_shell(guide, block)
    else:
        try:
            _run_python(guide, block)
        finally:
            _closes_twins(guide)
    if key in AFTER_BLOCK:
        AFTER_BLOCK[key](guide, block)
