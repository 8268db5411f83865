"""Local profiling into the database (the sink and `lpnet profile`), and `lpnet fit/predict/worker`."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from lpnet.arch.onnx_io import export_onnx
from profiler.protocol import TimingProtocol
from profiler.runner import run_profile
from profiler.sampling import ListSampler, Sample
from profiler.sinks import MeasurementSink
from service.config import FitSettings, Settings, WorkerSettings
from service.db.models import Device, NetworkMeasurement, Predictor, ProfileRun, RunStatus
from service.db.session import make_engine, make_session_factory
from service.main import create_app
from service.predictors import request_fit
from service.profiling import DatabaseSink, ProgressReporter
from service.testing.tiny import TINY_INPUT_SHAPE, TINY_SPEC, TinyProfile, tiny_module
from tests.service.support import Api, api_client
from tests.service.test_cli_commands import run_cli
from tests.service.test_health_api import LiveServer

PROFILE_ARGS = (
    "--families",
    "resnet18",
    "--image-size",
    "32",
    "--kinds",
    "network",
    "--network-samples",
    "3",
    "--quick",
    "--no-progress",
)


def network_rows(url: str) -> int:
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            return int(session.scalar(select(func.count()).select_from(NetworkMeasurement)) or 0)
    finally:
        engine.dispose()


def test_the_sink_commits_each_measurement_and_resumes(api: Api, tiny_profile: TinyProfile) -> None:
    with api.factory() as session:
        device = session.get(Device, api.device_id)
        assert device is not None
        sink = DatabaseSink(api.factory, device, tiny_profile.context)
    assert isinstance(sink, MeasurementSink)
    assert sink.done_keys() == set()
    first, second = tiny_profile.network_measurements[:2]
    sink.write(first)
    # Committed at once: another session sees it while the run goes on.
    with api.factory() as session:
        assert session.scalar(select(NetworkMeasurement.sample_key)) == first.sample_key
    sink.write(first)  # stored already (say, by an agent): skipped, not an error
    sink.write(second)
    assert sink.written == 2 and sink.duplicates == 1
    assert sink.done_keys() == {first.sample_key, second.sample_key}
    sink.close(RunStatus.INTERRUPTED, {"note": "test"})
    with api.factory() as session:
        run = session.get(ProfileRun, sink.run_id)
        assert (
            run is not None
            and run.status == "interrupted"
            and run.summary == {"written": 2, "duplicates": 1, "note": "test"}
        )
    # A new sink (a rerun) knows what the device has.
    with api.factory() as session:
        device = session.get(Device, api.device_id)
        assert device is not None
        assert DatabaseSink(api.factory, device, tiny_profile.context).done_keys() >= {first.sample_key}


def test_a_rerun_of_the_profiler_skips_what_is_stored(api: Api, tiny_profile: TinyProfile) -> None:
    networks = {
        m.architecture.content_hash: m.architecture
        for m in tiny_profile.network_measurements
        if m.architecture
    }
    samples = [
        Sample.for_network(network, TINY_SPEC, family="tiny") for network in list(networks.values())[:3]
    ]
    with api.factory() as session:
        device = session.get(Device, api.device_id)
        assert device is not None
        session.expunge(device)
    reporter = ProgressReporter(api.factory, api.device_id, budget_minutes=None, planned=3)
    sink = DatabaseSink(api.factory, device, tiny_profile.context)
    summary = run_profile(
        TINY_SPEC, ListSampler(samples), sink, TimingProtocol.quick(), progress=False, on_measurement=reporter
    )
    sink.close()
    assert summary.measured == 3 and reporter.count == 3
    assert reporter.progress(3.0) == (100.0, 0.0)
    again = DatabaseSink(api.factory, device, tiny_profile.context)
    rerun = run_profile(TINY_SPEC, ListSampler(samples), again, TimingProtocol.quick(), progress=False)
    assert rerun.measured == 0 and rerun.skipped == 3


def test_lpnet_profile_into_the_database_and_resume(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LPNET_DATABASE_URL", sqlite_url)
    assert run_cli(capsys, "device", "add", "here", "--hardware", "test-cpu")[0] == 0
    code, out, err = run_cli(capsys, "profile", "--device", "here", *PROFILE_ARGS)
    assert code == 0, err
    assert "network" in out and "skipped (already done): 0" in out
    assert network_rows(sqlite_url) == 3
    code, out, _ = run_cli(capsys, "profile", "--device", "here", *PROFILE_ARGS)
    assert code == 0 and "skipped (already done): 3" in out
    assert network_rows(sqlite_url) == 3
    code, out, _ = run_cli(capsys, "device", "list")
    assert "profiled" in out


def test_lpnet_profile_refuses_remote_and_unknown_devices(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LPNET_DATABASE_URL", sqlite_url)
    run_cli(capsys, "device", "add", "pi", "--remote", "--hardware", "Cortex-A72")
    code, _, err = run_cli(capsys, "profile", "--device", "pi", *PROFILE_ARGS)
    assert code == 1 and "remote" in err
    code, _, err = run_cli(capsys, "profile", "--device", "nope", *PROFILE_ARGS)
    assert code == 1 and "no device named 'nope'" in err
    code, _, err = run_cli(capsys, "profile", "--device", "pi", "--submit", "http://127.0.0.1:9")
    assert code == 2 and "agent key" in err


def test_lpnet_profile_submits_to_a_server(
    sqlite_migrated_url: str, live_server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with api_client(sqlite_migrated_url) as api:
        app = create_app(Settings(database_url=sqlite_migrated_url, worker=WorkerSettings(embedded=False)))
        with live_server(app) as base_url:
            args = ("profile", "--device", "tiny-cpu", "--submit", base_url, "--token", api.keys.agent)
            code, out, err = run_cli(capsys, *args, "--spool-dir", str(tmp_path / "spool"), *PROFILE_ARGS)
            assert code == 0, err
        device = api.get("/v1/devices/tiny-cpu", key="reader").json()
        assert device["profiling"]["network"]["ok"] == 3


@pytest.fixture
def cli_with_measurements(
    sqlite_migrated_url: str, tiny_profile: TinyProfile, monkeypatch: pytest.MonkeyPatch
) -> Api:
    monkeypatch.setenv("LPNET_DATABASE_URL", sqlite_migrated_url)
    monkeypatch.setenv("LPNET_FIT__STEPS", "60")
    monkeypatch.setenv("LPNET_FIT__MEMBERS", "2")
    with api_client(sqlite_migrated_url) as api:
        api.store_measurements(api.device_id, tiny_profile.measurements)
        return api


def test_lpnet_fit_then_predict(
    cli_with_measurements: Api, tiny_profile: TinyProfile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "predict", "--device", "tiny-cpu", "resnet18")
    assert code == 1 and "no fitted predictor" in err

    code, out, err = run_cli(
        capsys, "fit", "--device", "tiny-cpu", "--plot", str(tmp_path / "fit.png"), "--no-progress"
    )
    assert code == 0, err
    assert "predictor version 1" in out and "lpnet.within_10pct" in out
    assert (tmp_path / "fit.png").read_bytes().startswith(b"\x89PNG")

    arch = tmp_path / "tiny.json"
    arch.write_text(tiny_profile.network.model_dump_json())
    code, out, err = run_cli(capsys, "predict", "--device", "tiny-cpu", "--json", str(arch))
    assert code == 0, err
    assert "ms (interval" in out and "predictor version 1" in out
    assert all(layer.name in out for layer in tiny_profile.network.layers)

    onnx = tmp_path / "tiny.onnx"
    onnx.write_bytes(export_onnx(tiny_module().eval(), TINY_INPUT_SHAPE))
    code, out, _ = run_cli(capsys, "predict", "--device", "tiny-cpu", "--onnx", str(onnx), "--top", "2")
    assert code == 0 and out.count("\n") == 5  # headline, table header, two layers, overhead

    code, out, _ = run_cli(
        capsys, "predict", "--device", "tiny-cpu", "resnet18", "--input-shape", "1,3,64,64"
    )
    assert code == 0 and "warning:" in out  # far outside what the tiny predictor saw


def test_lpnet_fit_with_too_few_measurements(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LPNET_DATABASE_URL", sqlite_url)
    run_cli(capsys, "device", "add", "here", "--hardware", "test-cpu")
    code, _, err = run_cli(capsys, "fit", "--device", "here")
    assert code == 1 and "measure 26 more" in err


def test_lpnet_worker_once_runs_queued_jobs(
    cli_with_measurements: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    api = cli_with_measurements
    with api.factory() as session:
        device = session.get(Device, api.device_id)
        assert device is not None
        request_fit(session, device, max_attempts=1, settings=FitSettings(steps=60, members=2))
        session.commit()
    code, out, err = run_cli(capsys, "worker", "--once")
    assert code == 0, err
    assert "ran 1 job(s)" in out
    with api.factory() as session:
        assert session.scalar(select(func.count()).select_from(Predictor)) == 1


def test_device_list_shows_progress(cli_with_measurements: Api, capsys: pytest.CaptureFixture[str]) -> None:
    from service.devices import set_device_status

    set_device_status(
        cli_with_measurements.factory,
        cli_with_measurements.device_id,
        "profiling",
        percent=42,
        eta_seconds=90,
    )
    code, out, _ = run_cli(capsys, "device", "list")
    assert code == 0 and "profiling 42% eta 90 s" in out
