"""deploy/lambda/template.yaml (AWS SAM) and build.sh against the handler they package."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAMBDA_DIR = ROOT / "deploy" / "lambda"
TEMPLATE = LAMBDA_DIR / "template.yaml"


class CfnLoader(yaml.SafeLoader):
    """Reads CloudFormation short forms (!Ref, !GetAtt, !Sub, !If ...) as {"Fn": value}."""


def _cfn_tag(loader, tag_suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    name = "Ref" if tag_suffix == "Ref" else f"Fn::{tag_suffix}"
    return {name: value}


CfnLoader.add_multi_constructor("!", _cfn_tag)


@pytest.fixture(scope="module")
def template() -> dict:
    return yaml.load(TEMPLATE.read_text(), Loader=CfnLoader)


@pytest.fixture(scope="module")
def handler():
    spec = importlib.util.spec_from_file_location("avsr_lambda_handler_for_template", LAMBDA_DIR / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def function(template) -> dict:
    return template["Resources"]["SubmitFunction"]["Properties"]


def test_function_points_at_the_handler_and_the_build_output(function, handler):
    module, _, name = function["Handler"].partition(".")
    assert module == "handler" and callable(getattr(handler, name))
    assert function["CodeUri"] == "dist/avsr-submit.zip"
    assert "dist/avsr-submit.zip" in (LAMBDA_DIR / "build.sh").read_text()
    assert function["Runtime"].startswith("python3.")


def test_environment_is_what_the_handler_reads(function, handler):
    variables = set(function["Environment"]["Variables"])
    assert variables <= set(handler.ENVIRONMENT), variables - set(handler.ENVIRONMENT)
    assert {"AVSR_API_URL", "AVSR_API_KEY_PARAMETER"} <= variables
    assert "AVSR_API_KEY" not in variables, "the key comes from SSM, not from plain configuration"


def test_retries_fit_in_the_function_timeout(function):
    env = function["Environment"]["Variables"]
    attempts, timeout, base = int(env["AVSR_SUBMIT_ATTEMPTS"]), float(env["AVSR_HTTP_TIMEOUT_S"]), float(
        env["AVSR_RETRY_BASE_S"])
    worst = attempts * timeout + sum(base * 2**i * 1.2 for i in range(attempts - 1))
    assert worst < function["Timeout"], f"{worst:.1f}s of retries for one job vs Timeout {function['Timeout']}"


def test_s3_triggers_are_object_created_with_prefix_and_suffix_filters(template, function, handler):
    params = template["Parameters"]
    events = function["Events"]
    assert {e["Type"] for e in events.values()} == {"S3"}
    for event in events.values():
        props = event["Properties"]
        assert props["Bucket"] == {"Ref": "InputBucket"}
        assert props["Events"] == "s3:ObjectCreated:*"
        rules = {r["Name"]: r["Value"] for r in props["Filter"]["S3Key"]["Rules"]}
        assert rules["prefix"] == {"Ref": "InputPrefix"}
    suffixes = [r["Value"] for e in events.values() for r in e["Properties"]["Filter"]["S3Key"]["Rules"]
                if r["Name"] == "suffix"]
    assert {"Ref": "VideoSuffix"} in suffixes and {"Fn::Sub": "/${MarkerName}"} in suffixes
    assert params["VideoSuffix"]["Default"] in handler.DEFAULT_VIDEO_EXTENSIONS.split(",")
    assert params["MarkerName"]["Default"] == "_DONE"
    assert function["Environment"]["Variables"]["AVSR_PREFIX_MARKER"] == {"Ref": "MarkerName"}


def test_least_privilege_role_reserved_concurrency_and_failure_destination(template, function):
    resources = template["Resources"]
    role = resources["SubmitFunctionRole"]["Properties"]
    statements = [s for p in role["Policies"] for s in p["PolicyDocument"]["Statement"]]
    actions = {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert actions == {"ssm:GetParameter", "sqs:SendMessage"}
    assert not any("*" in str(s["Resource"]) for s in statements), "no wildcard resources"
    assert function["Role"] == {"Fn::GetAtt": "SubmitFunctionRole.Arn"}
    assert function["ReservedConcurrentExecutions"] == {"Ref": "ReservedConcurrency"}
    on_failure = function["EventInvokeConfig"]["DestinationConfig"]["OnFailure"]
    assert on_failure["Destination"] == {"Fn::GetAtt": "FailureQueue.Arn"}
    assert resources["FailureQueue"]["Type"] == "AWS::SQS::Queue"


def test_cfn_lint_passes():
    cfn_lint = shutil.which("cfn-lint")
    if cfn_lint is None:
        pytest.skip("cfn-lint is not installed")
    result = subprocess.run([cfn_lint, str(TEMPLATE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_sh_zips_the_handler_at_the_root(tmp_path):
    for name in ("build.sh", "handler.py"):
        shutil.copy(LAMBDA_DIR / name, tmp_path / name)
    result = subprocess.run(["bash", str(tmp_path / "build.sh")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(tmp_path / "dist" / "avsr-submit.zip") as archive:
        assert archive.namelist() == ["handler.py"]
        assert archive.read("handler.py") == (LAMBDA_DIR / "handler.py").read_bytes()
