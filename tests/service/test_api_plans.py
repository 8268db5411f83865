"""Plans (and the weights they may use): checks at request time, the job, the result."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import save

from lpnet.arch.groups import channel_layout
from lpnet.pruning import group_l1_scores
from service.job_handlers import default_registry
from service.jobs.worker import Worker
from service.testing.tiny import TinyProfile, tiny_module
from tests.service.support import Api, api_client, feasible_budget
from tests.service.test_health_api import assert_error_shape


def budget_at(profile: TinyProfile, share: float) -> float:
    return feasible_budget(profile.fitted.artifact, profile.network, share)


def plan_request(profile: TinyProfile, budget_ms: float, **options: Any) -> dict[str, Any]:
    return {
        "device": "tiny-cpu",
        "architecture": profile.network.model_dump(mode="json"),
        "budget_ms": budget_ms,
        "options": options,
    }


def run_plan(api: Api, request: dict[str, Any], key: str = "reader") -> dict[str, Any]:
    accepted = api.post("/v1/plans", key=key, json=request)
    assert accepted.status_code == 202, accepted.text
    plan_id = accepted.json()["job_id"]
    assert accepted.json()["status_url"] == f"/v1/plans/{plan_id}"
    queued = api.get(f"/v1/plans/{plan_id}", key="reader").json()
    assert queued["status"] == "queued" and queued["result"] is None
    Worker(api.factory, default_registry()).run_once()
    plan: dict[str, Any] = api.get(f"/v1/plans/{plan_id}", key="reader").json()
    return plan


def test_architecture_plan_meets_the_budget(api_with_predictor: Api, tiny_profile: TinyProfile) -> None:
    budget = budget_at(tiny_profile, 0.5)
    plan = run_plan(api_with_predictor, plan_request(tiny_profile, budget, round_to=8))
    assert plan["status"] == "succeeded", plan["error"]
    assert plan["budget_ms"] == budget and plan["options"]["mode"] == "architecture"
    result = plan["result"]
    assert result["mode"] == "architecture-only"
    assert result["predicted"]["total_ms"] <= budget
    assert result["predictor_id"] == api_with_predictor.extra["predictor_id"]
    layout = channel_layout(tiny_profile.network)
    assert len(result["widths"]) == len(layout.groups)
    assert all(w % 8 == 0 and w <= g.channels for w, g in zip(result["widths"], layout.groups, strict=True))
    assert result["pruned_network"]["layers"]
    assert result["verified"] is False


def test_plans_report_the_allocation_band_they_were_held_to(
    api_with_predictor: Api, tiny_profile: TinyProfile
) -> None:
    from lpnet.gates.allocation import AllocationBand, AllocationPolicy
    from lpnet.gates.problem import PlanningProblem
    from lpnet.predictor.artifact import load_predictor

    budget = budget_at(tiny_profile, 0.5)
    layout = channel_layout(tiny_profile.network)
    problem = PlanningProblem.build(tiny_profile.network, load_predictor(tiny_profile.fitted.artifact))
    # The defaults: a factor of 1.25 around the uniform keep ratio, a quarter of each group at least.
    default = run_plan(api_with_predictor, plan_request(tiny_profile, budget))
    assert default["status"] == "succeeded", default["error"]
    assert default["options"]["max_skew"] == 1.25 and default["options"]["min_keep_ratio"] == 0.25
    for options in ({"max_skew": 2.0, "min_keep_ratio": 0.3}, {"max_skew": None, "min_keep_ratio": 0.5}):
        plan = run_plan(api_with_predictor, plan_request(tiny_profile, budget, **options))
        assert plan["status"] == "succeeded", plan["error"]
        assert {k: plan["options"][k] for k in options} == options
        result = plan["result"]
        allocation = result["allocation"]
        assert allocation["max_skew"] == options["max_skew"]
        assert allocation["min_keep_ratio"] == options["min_keep_ratio"]
        ratios = [w / g.channels for w, g in zip(result["widths"], layout.groups, strict=True)]
        assert allocation["keep_ratio_min"] == pytest.approx(min(ratios))
        assert allocation["keep_ratio_max"] == pytest.approx(max(ratios))
        band = AllocationBand.at(
            problem, budget, AllocationPolicy(options["max_skew"], float(options["min_keep_ratio"]))
        )
        assert allocation["uniform_keep_ratio"] == pytest.approx(band.uniform)
        assert [allocation["band_low"], allocation["band_high"]] == pytest.approx(list(band.envelope))
        outside = band.outside(result["widths"])
        assert allocation["groups_outside_band"] == outside
        # Inside the band, or the plan says why it is not; never under the minimum without a word.
        leaves = [w for w in result["warnings"] if "allocation band" in w or "min_keep_ratio" in w]
        assert bool(leaves) == bool(outside or band.under_minimum(result["widths"])), result["warnings"]
    assert default["result"]["allocation"]["max_skew"] == 1.25


def test_weights_plan_keeps_chosen_filters(sqlite_migrated_url: str, tiny_profile: TinyProfile) -> None:
    with api_client(sqlite_migrated_url) as api:
        api.store_measurements(api.device_id, tiny_profile.measurements)
        api.store_predictor(api.device_id, tiny_profile.fitted)
        module = tiny_module()
        weights = save({k: v.contiguous() for k, v in module.state_dict().items()})
        architecture = tiny_profile.network.model_dump_json()
        upload = api.post(
            "/v1/models",
            files={"file": ("tiny.safetensors", weights)},
            data={"name": "tiny", "architecture": architecture},
        )
        assert upload.status_code == 201, upload.text
        model = upload.json()
        assert model["size_bytes"] == len(weights) and len(model["sha256"]) == 64
        assert api.get(f"/v1/models/{model['id']}", key="reader").json() == model

        budget = budget_at(tiny_profile, 0.5)
        norms = group_l1_scores(module, tiny_profile.network)
        for filters in ("l1", "gates"):
            request = plan_request(
                tiny_profile, budget, mode="weights", model_id=model["id"], filters=filters
            )
            plan = run_plan(api, request)
            assert plan["status"] == "succeeded", plan["error"]
            assert plan["options"]["filters"] == filters
            groups = plan["result"]["groups"]
            assert all(len(g["kept_indices"]) == g["kept"] for g in groups)
            # l1 keeps the largest filters by L1 norm, gates the W-Gates' highest scores.
            by_norm = [
                torch.allclose(torch.tensor(g["scores"]), n.float())
                for g, n in zip(groups, norms, strict=True)
            ]
            assert all(by_norm) if filters == "l1" else not any(by_norm)


def test_verified_plans_measure_on_a_local_device(api_with_predictor: Api, tiny_profile: TinyProfile) -> None:
    budget = budget_at(tiny_profile, 0.6)
    plan = run_plan(api_with_predictor, plan_request(tiny_profile, budget, verify=True), key="admin")
    assert plan["status"] == "succeeded", plan["error"]
    assert plan["result"]["verified"] is True and plan["result"]["measured_ms"] > 0
    # The tiny predictor was fitted on milliseconds: the raw medians are what is judged.
    first = plan["result"]["rounds"][0]
    assert first["measured_ms"] > 0 and first["measured_ms"] == first["measured_raw_ms"]
    assert first["probe_ms"] is None and first["nominal_probe_ms"] is None


@pytest.mark.slow
def test_verified_plans_judge_at_the_speed_the_predictor_was_fitted_at(
    sqlite_api: Api, tiny_profile: TinyProfile
) -> None:
    api = sqlite_api
    from service.config import FitSettings
    from service.predictors import fit_from_samples
    from service.training_set import training_samples

    api.store_measurements(api.device_id, tiny_profile.measurements)
    with api.factory() as session:
        training = training_samples(session, api.device_id)
    assert training.labels == "probe" and training.nominal_probe_ms is not None
    api.store_predictor(api.device_id, fit_from_samples(training, settings=FitSettings(steps=200, members=3)))
    budget = budget_at(tiny_profile, 0.6)
    plan = run_plan(api, plan_request(tiny_profile, budget, verify=True), key="admin")
    assert plan["status"] == "succeeded", plan["error"]
    for round_ in plan["result"]["rounds"]:
        assert round_["nominal_probe_ms"] == pytest.approx(training.nominal_probe_ms)
        assert round_["probe_ms"] > 0 and round_["measured_raw_ms"] > 0 and round_["measured_ms"] > 0


def test_verify_on_a_local_device_needs_an_admin_key(
    api_with_predictor: Api, tiny_profile: TinyProfile
) -> None:
    api = api_with_predictor
    request = plan_request(tiny_profile, budget_at(tiny_profile, 0.6), verify=True)
    error = assert_error_shape(api.post("/v1/plans", key="reader", json=request), 403, "permission_denied")
    assert "verify on local device 'tiny-cpu'" in str(error["message"]) and "admin" in str(error["message"])
    assert error["details"] == {
        "scope": "reader",
        "needed": "admin",
        "option": "verify",
        "device": "tiny-cpu",
    }
    assert api.get("/v1/jobs", key="reader").json()["items"] == []  # nothing was queued
    # Without verify a reader may plan for the device; with it an admin may.
    assert api.post("/v1/plans", key="reader", json={**request, "options": {}}).status_code == 202
    assert api.post("/v1/plans", key="admin", json=request).status_code == 202


@pytest.mark.parametrize("budget", [0, -1.5])
def test_non_positive_budgets_are_422(
    api_with_predictor: Api, tiny_profile: TinyProfile, budget: float
) -> None:
    response = api_with_predictor.post("/v1/plans", key="reader", json=plan_request(tiny_profile, budget))
    assert "budget_ms" in str(assert_error_shape(response, 422, "validation_error")["message"])


def test_unreachable_budgets_are_422_naming_the_least_latency(
    api_with_predictor: Api, tiny_profile: TinyProfile
) -> None:
    response = api_with_predictor.post("/v1/plans", key="reader", json=plan_request(tiny_profile, 1e-6))
    error = assert_error_shape(response, 422, "budget_infeasible")
    least = error["details"]["min_achievable_ms"]  # type: ignore[index]
    assert least > 1e-6 and f"{least:.4g}" in str(error["message"])
    assert api_with_predictor.get("/v1/jobs", key="reader").json()["items"] == []


def test_unknown_device_and_missing_predictor(api: Api, tiny_profile: TinyProfile) -> None:
    request = plan_request(tiny_profile, 1.0)
    assert_error_shape(
        api.post("/v1/plans", key="reader", json={**request, "device": "nope"}), 404, "not_found"
    )
    assert_error_shape(api.post("/v1/plans", key="reader", json=request), 409, "no_predictor")


@pytest.mark.parametrize(
    ("options", "code", "words"),
    [
        ({"mode": "weights"}, "invalid_plan_options", "model_id"),
        ({"model_id": 1}, "invalid_plan_options", "weights mode"),
        ({"mode": "weights", "model_id": 77}, "not_found", "no uploaded model"),
        ({"round_to": 0}, "validation_error", "round_to"),
        ({"mode": "magic"}, "validation_error", "mode"),
        ({"max_skew": 0.5}, "validation_error", "max_skew"),
        ({"max_skew": 0}, "validation_error", "max_skew"),
        ({"max_skew": "wide"}, "validation_error", "max_skew"),
        ({"min_keep_ratio": 0}, "validation_error", "min_keep_ratio"),
        ({"min_keep_ratio": -0.25}, "validation_error", "min_keep_ratio"),
        ({"min_keep_ratio": 1.5}, "validation_error", "min_keep_ratio"),
        ({"filters": "best"}, "validation_error", "filters"),
    ],
)
def test_bad_options_are_refused(
    api_with_predictor: Api, tiny_profile: TinyProfile, options: dict[str, Any], code: str, words: str
) -> None:
    response = api_with_predictor.post(
        "/v1/plans", key="reader", json=plan_request(tiny_profile, 1.0, **options)
    )
    error = assert_error_shape(response, 404 if code == "not_found" else 422, code)
    assert words in str(error["message"])


def test_the_train_mode_is_not_a_plan_requests_mode(
    api_with_predictor: Api, tiny_profile: TinyProfile
) -> None:
    # It trains on a dataset, which a plan request cannot carry: the request schema does not offer it.
    response = api_with_predictor.post(
        "/v1/plans", key="reader", json=plan_request(tiny_profile, 1.0, mode="train")
    )
    error = assert_error_shape(response, 422, "validation_error")
    [problem] = error["details"]["errors"]  # type: ignore[index]
    assert problem["field"] == "body.options.mode"
    assert "'architecture'" in problem["message"] and "'weights'" in problem["message"]
    assert "train" not in problem["message"]


def test_plan_request_options_are_the_planners_own() -> None:
    from lpnet.gates.options import MAX_SKEW, MIN_KEEP_RATIO, ROUND_TO, PlanMode
    from lpnet.gates.planner import PlanOptions as PlannerOptions
    from service.plans import planner_options
    from service.schemas.plans import PlanOptions

    # The request schema states the planner's defaults, bounds and descriptions ...
    schema = PlanOptions.model_json_schema()["properties"]
    for spec in (ROUND_TO, MAX_SKEW, MIN_KEEP_RATIO):
        assert (schema[spec.name]["default"], schema[spec.name]["description"]) == (
            spec.default,
            spec.description,
        )
    assert (schema["round_to"]["minimum"], schema["round_to"]["maximum"]) == (ROUND_TO.ge, ROUND_TO.le)
    assert schema["min_keep_ratio"]["exclusiveMinimum"] == MIN_KEEP_RATIO.gt
    # ... and hands every field the planner has over to it, under the planner's name for the mode.
    assert planner_options(PlanOptions()) == PlannerOptions(mode=PlanMode.ARCHITECTURE_ONLY)
    request = PlanOptions(
        mode="weights", model_id=3, verify=True, round_to=16, max_skew=None, min_keep_ratio=0.5
    )
    assert planner_options(request) == PlannerOptions(
        mode=PlanMode.WEIGHTS, round_to=16, max_skew=None, min_keep_ratio=0.5
    )


def test_verify_on_a_remote_device_is_queued_for_its_agent(
    api_with_predictor: Api, tiny_profile: TinyProfile
) -> None:
    api = api_with_predictor
    device_id, _ = api.add_device("remote-cpu", local=False)
    api.store_predictor(device_id, tiny_profile.fitted)
    request = {
        **plan_request(tiny_profile, budget_at(tiny_profile, 0.6), verify=True),
        "device": "remote-cpu",
    }
    accepted = api.post("/v1/plans", key="reader", json=request)
    assert accepted.status_code == 202, accepted.text
    plan = api.get(accepted.json()["status_url"], key="reader").json()
    assert plan["status"] == "queued" and plan["device_id"] == device_id and plan["options"]["verify"] is True
    assert plan["deadline_at"] is not None


def test_unknown_plan_is_404(api: Api) -> None:
    assert_error_shape(api.get("/v1/plans/12345", key="reader"), 404, "not_found")


def test_model_uploads_take_safetensors_only(migrated_url: str) -> None:
    with api_client(migrated_url, max_weights_bytes=4096) as api:
        pickled = api.post(
            "/v1/models", files={"file": ("w.pt", b"\x80\x04\x95not safetensors")}, data={"name": "w"}
        )
        assert "safetensors" in str(assert_error_shape(pickled, 422, "invalid_input")["message"])
        big = save({"w": tiny_module().down.weight.detach().contiguous()})
        too_big = api.post("/v1/models", files={"file": ("w.safetensors", big)}, data={"name": "w"})
        assert_error_shape(too_big, 413, "request_too_large")
        small = save({"w": tiny_module().fc.bias.detach().contiguous()})
        bad_arch = api.post(
            "/v1/models", files={"file": ("w.safetensors", small)}, data={"name": "w", "architecture": "{}"}
        )
        assert_error_shape(bad_arch, 422, "invalid_input")
        ok = api.post("/v1/models", files={"file": ("w.safetensors", small)}, data={"name": "w"})
        assert ok.status_code == 201 and ok.json()["architecture"] is None
        assert_error_shape(api.get("/v1/models/999", key="reader"), 404, "not_found")
        assert_error_shape(
            api.post("/v1/models", key="reader", files={"file": ("w", small)}, data={"name": "w"}),
            403,
            "permission_denied",
        )
