"""`finetune plan` as a user runs it: the real console script, the examples, invalid manifests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_operator import cli

from .invalid_corpus import CASES

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
FINETUNE = shutil.which("finetune", path=str(Path(sys.executable).parent)) or "finetune"

# (method, parameters in the model name) -> (gpus, GiB): the model-size table.
TABLE = {
    ("full", "7B"): (4, 24),
    ("lora", "7B"): (1, 24),
    ("qlora", "7B"): (1, 12),
    ("full", "13B"): (8, 24),
    ("lora", "13B"): (1, 48),
    ("qlora", "13B"): (1, 24),
    ("full", "70B"): (16, 48),
    ("lora", "70B"): (2, 48),
    ("qlora", "70B"): (1, 48),
}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FINETUNE, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_plan_examples_json_gives_the_table_for_all_nine_cells():
    result = run("plan", *map(str, EXAMPLES), "-o", "json")
    assert result.returncode == 0, result.stderr
    plans = json.loads(result.stdout)
    assert isinstance(plans, list) and len(plans) == len(EXAMPLES)
    seen = set()
    for item in plans:
        assert set(item) == {"name", "namespace", "plan"} | ({"pilot"} if "pilot" in item else set())
        if "pilot" in item:  # spec.pilot: the LoRA pilot's own plan, from the same table
            assert (item["pilot"]["method"], item["pilot"]["gpus"], item["pilot"]["gpuMemoryGiB"]) == ("lora", 1, 24)
        plan = item["plan"]
        assert set(plan) >= {"method", "gpus", "gpuMemoryGiB", "nodes", "gpusPerNode", "estimatedMemoryGiB", "source", "reason"}
        doc = yaml.safe_load(next(p for p in EXAMPLES if yaml.safe_load(p.read_text())["metadata"]["name"] == item["name"]).read_text())
        if doc["spec"].get("objective") == "dpo":  # the table is for sft: the memory model sizes dpo (pairs, reference)
            assert plan["source"] == "estimate" and "memory model" in plan["reason"], item
            continue
        size = {"7": "7B", "13": "13B", "70": "70B"}[
            next(s for s in ("70", "13", "7") if f"-{s}b" in doc["spec"]["baseModel"]["uri"].lower())
        ]
        key = (plan["method"], size)
        if plan["method"] in ("prefix", "prompt"):  # not in the table: the memory model sizes them
            assert plan["source"] == "estimate" and "memory model" in plan["reason"], item
            continue
        assert (plan["gpus"], plan["gpuMemoryGiB"]) == TABLE[key], item
        assert plan["source"] == "table"
        assert plan["nodes"] == -(-plan["gpus"] // 8)
        seen.add(key)
    assert seen == set(TABLE), f"examples miss table cells: {set(TABLE) - seen}"


def test_plan_single_manifest_json_is_one_object():
    result = run("plan", str(ROOT / "examples" / "healthcare-lora.yaml"), "-o", "json")
    data = json.loads(result.stdout)
    assert data["name"] == "healthcare-assistant"
    assert data["plan"]["method"] == "lora" and data["plan"]["gpus"] == 1


def test_plan_table_output_names_each_job_and_reason():
    result = run("plan", str(ROOT / "examples" / "full-70b-multinode.yaml"))
    assert result.returncode == 0
    assert "llama2-70b-full" in result.stdout and "16x48GiB from the model-size table" in result.stdout


def test_invalid_manifests_exit_non_zero_with_one_line_per_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    files = []
    for case in CASES:
        path = tmp_path / f"{case.id}.yaml"
        path.write_text(yaml.safe_dump(case.manifest()))
        files.append(path)
    code = cli.main(["plan", *map(str, files), "-o", "json"])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_INVALID
    assert out == "", "nothing may reach stdout when a manifest is invalid"
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    for case in CASES:
        mine = [line for line in lines if line.startswith(f"{tmp_path / case.id}.yaml")]
        assert any(f": {case.path}: " in line and case.fragment in line for line in mine), (case.id, mine)
    assert lines[-1].startswith("error: ") and f"in {len(CASES)} of {len(CASES)} manifest(s)" in lines[-1]


def test_invalid_manifest_through_the_console_script_has_no_traceback(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(CASES[0].manifest()))
    result = run("plan", str(bad))
    assert result.returncode == 1
    assert "spec.method: must be one of" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_missing_file_is_reported(tmp_path: Path):
    result = run("plan", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1 and "no such file" in result.stderr


def test_crd_command_prints_the_generated_crd():
    result = run("crd")
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout)["kind"] == "CustomResourceDefinition"


def test_operator_package_imports_without_torch():
    code = (
        "import sys, finetune_operator.cli, finetune_operator.spec, finetune_operator.sizing, "
        "finetune_operator.crd, finetune_operator.manifests, finetune_operator.contract, "
        "finetune_operator.local_preflight; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _docs(stdout: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(stdout) if d]


def test_plan_yaml_prints_exactly_the_children_for_kubectl_apply():
    result = run("plan", str(ROOT / "examples" / "healthcare-lora.yaml"), "-o", "yaml")
    assert result.returncode == 0, result.stderr
    docs = _docs(result.stdout)
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "NetworkPolicy", "Job"]
    assert result.stdout.startswith("# name: healthcare-assistant")
    job = docs[3]
    config = json.loads(docs[0]["data"]["job.json"])
    assert len(config["rendezvousId"]) == 32  # drawn per rendering, as the operator does per job
    assert job["spec"]["completionMode"] == "Indexed"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for doc in docs:
        assert "ownerReferences" not in doc["metadata"]  # no uid at plan time; kubectl apply accepts it


def test_plan_yaml_70b_full_is_a_two_node_indexed_job_with_8_gpus_per_pod():
    result = run("plan", str(ROOT / "examples" / "full-70b-multinode.yaml"), "-o", "yaml")
    job = _docs(result.stdout)[3]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_plan_yaml_output_validates_against_kubernetes_schemas():
    import kubernetes_validate

    result = run("plan", *map(str, EXAMPLES), "-o", "yaml")
    docs = _docs(result.stdout)
    # a chained stage (spec.baseModel.fromJob) has no children before its base job succeeded: a comment only
    chained = [p for p in EXAMPLES if "fromJob" in yaml.safe_load(p.read_text())["spec"]["baseModel"]]
    assert chained and "the operator creates this job's children once FineTuneJob healthcare-sft" in result.stdout
    assert len(docs) == 4 * (len(EXAMPLES) - len(chained))
    for doc in docs:
        kubernetes_validate.validate(doc, "1.31.0", strict=True)


def test_plan_accepts_prefix_and_prompt_tuning(tmp_path: Path):
    files = []
    for method, block in (("prefix", {"virtualTokens": 20}), ("prompt", {"init": "text", "initText": "Answer"})):
        doc = yaml.safe_load((ROOT / "examples" / "healthcare-lora.yaml").read_text())
        doc["metadata"]["name"] = f"healthcare-{method}"
        doc["spec"]["method"] = method
        doc["spec"][method] = block
        doc["spec"]["hyperparameters"]["gradientCheckpointing"] = method == "prompt"
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(path)
    result = run("plan", *map(str, files), "-o", "json")
    assert result.returncode == 0, result.stderr
    plans = {item["name"]: item["plan"] for item in json.loads(result.stdout)}
    for method in ("prefix", "prompt"):
        plan = plans[f"healthcare-{method}"]
        assert (plan["method"], plan["source"], plan["gpus"]) == (method, "estimate", 1)
        assert "frozen base weights" in plan["reason"] and "tiny trainable state" in plan["reason"]
    table = run("plan", str(files[0]))
    assert table.returncode == 0 and "healthcare-prefix" in table.stdout and "estimate" in table.stdout


def test_plan_shows_the_serving_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """spec.serving: the table says what is served, under which names, and where the manifests go; -o json has it."""
    doc = yaml.safe_load((ROOT / "examples" / "healthcare-lora.yaml").read_text())
    doc["spec"]["lora"] = {"r": 24}
    doc["spec"]["serving"] = {"adapterName": "triage", "apply": True}
    lora = tmp_path / "lora.yaml"
    lora.write_text(yaml.safe_dump(doc))
    doc["metadata"]["name"] = "merged"
    doc["spec"]["output"]["saveMerged"] = True
    doc["spec"]["serving"] = {"baseModelName": "triage-7b"}
    merged = tmp_path / "merged.yaml"
    merged.write_text(yaml.safe_dump(doc))
    output = doc["spec"]["output"]["uri"].rstrip("/")

    assert cli.main(["plan", str(lora), str(merged)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if ": serving: " in line]
    name = yaml.safe_load(lora.read_text())["metadata"]["name"]
    assert lines[:4] == [
        f"{name}: serving: model {doc['spec']['baseModel']['uri']} served as "
        f"{doc['spec']['baseModel']['uri'].removeprefix('hf://')!r}",
        f"{name}: serving: adapter 'triage' from {output}/model/ (vLLM --max-lora-rank 32)",
        f"{name}: serving: manifests (written when training succeeds): {output}/serving/llminferenceservice.yaml, "
        f"{output}/serving/vllm.yaml",
        f"{name}: serving: apply: the operator creates the LLMInferenceService once the job Succeeded with every "
        "gate passed",
    ]
    assert lines[4:6] == [f"merged: serving: model {output}/merged/ served as 'triage-7b'",
                          "merged: serving: no adapter: the served model is the whole fine-tuned model"]

    assert cli.main(["plan", str(lora), "-o", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["serving"] == {
        "baseModelName": doc["spec"]["baseModel"]["uri"].removeprefix("hf://"), "modelUri": doc["spec"]["baseModel"]["uri"],
        "adapterName": "triage", "adapterUri": f"{output}/model/", "maxRank": 32,
        "manifests": [f"{output}/serving/llminferenceservice.yaml", f"{output}/serving/vllm.yaml"], "apply": True,
    }


# `finetune plan --inspect`: the base model's architecture read from its files (test_architecture writes them).
def _local_job(tmp_path: Path, uri: str, name: str = "local-model", **base: str) -> Path:
    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
           "spec": {"baseModel": {"uri": uri, **base}, "method": "lora", "dataset": {"train": "s3://data/t.jsonl"},
                    "output": {"uri": "s3://out/run/"}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _model(directory: Path, config: dict) -> Path:
    from .test_architecture import llama_tensors, write_safetensors

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    write_safetensors(directory / "model.safetensors", llama_tensors(config))
    return directory


def test_a_local_model_without_a_size_is_refused_with_a_pointer_to_inspect(tmp_path: Path, capsys):
    from .test_architecture import LLAMA3_8B

    model = _model(tmp_path / "my-model", LLAMA3_8B)
    job = _local_job(tmp_path, f"file://{model}")
    assert cli.main(["plan", str(job)]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert "set spec.baseModel.parameters" in err and "finetune plan --inspect" in err


def test_inspect_plans_a_local_model_from_its_config_and_safetensors(tmp_path: Path, capsys):
    from .test_architecture import LLAMA3_8B

    model = _model(tmp_path / "my-model", LLAMA3_8B)
    job = _local_job(tmp_path, f"file://{model}")
    assert cli.main(["plan", "--inspect", str(job), "-o", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["architecture"]["parameters"] == 8_030_261_248
    assert (out["architecture"]["parametersSource"], out["architecture"]["kvHeads"]) == ("safetensors headers", 8)
    plan = out["plan"]
    assert plan["source"] == "estimate" and f"architecture read from {model}/config.json" in plan["reason"]
    assert "8,030,261,248 parameters" in plan["reason"]
    assert cli.main(["plan", "--inspect", str(job)]) == 0
    table = capsys.readouterr().out
    assert f"local-model: inspected {model}: 8,030,261,248 parameters" in table
    # the rendered config carries the exact size, so the operator can plan the job without the files
    assert cli.main(["plan", "--inspect", str(job), "-o", "yaml"]) == 0
    assert "8030.261248M" in capsys.readouterr().out


def test_inspect_without_the_trainer_plans_from_the_model_alone_with_one_note(tmp_path: Path, capsys, monkeypatch):
    import importlib.util

    from .test_architecture import LLAMA3_8B

    model = _model(tmp_path / "my-model", LLAMA3_8B)
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    jobs = []
    for name in ("first", "second"):
        job = _local_job(tmp_path, f"file://{model}", name=name)
        doc = yaml.safe_load(job.read_text())
        doc["spec"]["dataset"]["train"] = f"file://{data}"
        job.write_text(yaml.safe_dump(doc))
        jobs.append(str(job))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "finetune_trainer" else find_spec(name, *args))
    assert cli.main(["plan", "--inspect", *jobs, "-o", "json"]) == 0
    captured = capsys.readouterr()
    plans = json.loads(captured.out)
    assert [p["plan"]["estimate"] for p in plans] == [None, None]
    assert plans[0]["architecture"]["parameters"] == 8_030_261_248
    assert captured.err.splitlines() == [
        "note: the data was not counted: the trainer package (finetune_trainer) is not installed (pip install "
        "'finetune-operator[train]' -c constraints.txt); planned from the model alone"]


def test_inspect_keeps_the_table_for_a_nominal_size(tmp_path: Path, capsys):
    from .test_architecture import LLAMA2_7B

    model = _model(tmp_path / "llama-2-7b", LLAMA2_7B)
    assert cli.main(["plan", "--inspect", str(_local_job(tmp_path, f"file://{model}")), "-o", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert (plan["gpus"], plan["gpuMemoryGiB"], plan["source"]) == (*TABLE[("lora", "7B")], "table")
    assert "6,738,415,616 parameters" in plan["reason"]


def test_inspect_reads_pvc_through_a_mount_and_remote_uris_through_model_dir(tmp_path: Path, capsys):
    from .test_architecture import SMALL_TIED

    _model(tmp_path / "mnt" / "models" / "base", SMALL_TIED)
    pvc = _local_job(tmp_path, "pvc://models/models/base", name="on-pvc")
    assert cli.main(["plan", "--inspect", str(pvc)]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert "spec.baseModel.uri: cannot be inspected" in err and "inspection needs a readable path" in err
    assert "--mount models=" in err
    assert cli.main(["plan", "--inspect", "--mount", f"models={tmp_path / 'mnt'}", str(pvc), "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"]["tiedEmbeddings"] is True
    hf = _local_job(tmp_path, "hf://org/some-model", name="on-hub")
    assert cli.main(["plan", "--inspect", str(hf)]) == cli.EXIT_INVALID
    assert "is not on this machine; inspection needs a readable path" in capsys.readouterr().err
    assert cli.main(["plan", "--inspect", "--model-dir", str(tmp_path / "mnt/models/base"), str(hf)]) == 0
    assert "1,235,814,400 parameters" in capsys.readouterr().out


def test_inspect_reports_an_unreadable_config_naming_file_and_field(tmp_path: Path, capsys):
    from .test_architecture import LLAMA2_7B

    model = _model(tmp_path / "broken", LLAMA2_7B)
    (model / "config.json").write_text(json.dumps({k: v for k, v in LLAMA2_7B.items() if k != "vocab_size"}))
    assert cli.main(["plan", "--inspect", str(_local_job(tmp_path, f"file://{model}"))]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert f"{model}/config.json: field 'vocab_size' is missing" in err and "Traceback" not in err


def test_model_dir_and_mount_need_inspect(tmp_path: Path, capsys):
    job = _local_job(tmp_path, "hf://org/model-7b")
    assert cli.main(["plan", "--model-dir", str(tmp_path), str(job)]) == 2
    assert "add --inspect" in capsys.readouterr().err
    assert cli.main(["plan", "--inspect", "--mount", "no-equals-sign", str(job)]) == 2
    assert "expected CLAIM=PATH" in capsys.readouterr().err


def test_plan_inspect_prints_the_pairs_of_preference_data():
    """What `finetune plan --inspect` prints for a split of preference pairs (objective dpo): the pairs, the mean
    tokens per pair and the length bias the pre-flight counted."""
    import io

    from finetune_operator.contract import PreflightResult, PreflightSplit
    from finetune_operator.manifests import Loaded, validate_document

    from .invalid_corpus import DPO, Case

    loaded: Loaded = validate_document(Case("dpo", DPO, "", "").manifest())
    pairs = PreflightSplit(field="spec.dataset.train", uri="file:///data/pairs.jsonl", format="preference",
                           examples=199, tokens=59_700, sampled=False, pairs=199, tokens_per_pair=300.04,
                           length_bias=-12.35)
    loaded.preflight = PreflightResult(ok=True, model_uri="file:///models/tiny", output_uri="s3://out-bucket/x/",
                                       splits=[pairs], checked_at="2026-03-01T11:00:00Z")
    out = io.StringIO()
    cli._counts(loaded, out)
    assert ("spec.dataset.train file:///data/pairs.jsonl: 199 examples (preference), 59,700 tokens; 199 pairs, "
            "300.0 tokens per pair, length bias -12.3 tokens (chosen - rejected)") in out.getvalue()
