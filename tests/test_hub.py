"""push_to_hub against a local stand-in for the Hub API (HF_ENDPOINT): what huggingface_hub sends.

The server answers the calls huggingface_hub makes for an upload (repo create, README YAML
check, preupload, commit) and records them; the tests read the uploaded files back out of the
recorded commit (NDJSON, base64 file contents).
"""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from macft import FastLanguageModel


class FakeHub:
    def __init__(self):
        self.requests = []  # (method, path, parsed body)
        self.unexpected = []  # calls this stand-in does not know: a test fails on any
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(hub):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                if path.endswith("/commit/main"):
                    body = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
                else:
                    body = json.loads(raw or b"{}")
                hub.requests.append(("POST", path, body))
                if path == "/api/repos/create":
                    name = f"{body['organization']}/{body['name']}"
                    return self._json({"url": f"{hub.url}/{name}", "name": name})
                if path == "/api/validate-yaml":
                    return self._json({"errors": [], "warnings": []})
                if "/preupload/" in path:
                    return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                  "oid": None} for f in body["files"]]})
                if path.endswith("/commit/main"):
                    repo = path.removeprefix("/api/models/").removesuffix("/commit/main")
                    return self._json({"commitUrl": f"{hub.url}/{repo}/commit/0123abcd", "commitOid": "0123abcd",
                                       "pullRequestUrl": None})
                hub.unexpected.append(("POST", path))
                self._json({"error": f"unexpected {path}"}, 404)

            def do_GET(self):
                hub.requests.append(("GET", self.path, None))
                hub.unexpected.append(("GET", self.path))
                self._json({"error": f"unexpected {self.path}"}, 404)

            def _json(self, data, status=200):
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler

    def uploaded(self) -> dict:
        """path -> bytes of every file of the (last) commit."""
        commits = [body for method, path, body in self.requests if path.endswith("/commit/main")]
        assert commits, self.requests
        return {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                for item in commits[-1] if item["key"] == "file"}


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    fake = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; this "hub" is local
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    yield fake
    fake.server.shutdown()
    assert fake.unexpected == []


def test_model_push_to_hub_uploads_the_adapter_and_a_card(tiny_model_dir, hub):
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    url = model.push_to_hub("someone/tiny-adapter", tokenizer=tokenizer, private=True)
    assert url == f"{hub.url}/someone/tiny-adapter/commit/0123abcd"

    create = [body for _, path, body in hub.requests if path == "/api/repos/create"]
    assert create == [{"name": "tiny-adapter", "organization": "someone", "visibility": "private", "type": "model"}]
    files = hub.uploaded()
    assert {"adapters.safetensors", "adapter_model.safetensors", "adapter_config.json", "README.md",
            "tokenizer.json"} <= set(files)
    config = json.loads(files["adapter_config.json"])
    assert config["r"] == 4 and config["peft_type"] == "LORA" and config["lora_parameters"]["rank"] == 4
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: peft\n")
    assert f"| base model | {tiny_model_dir('llama')} |" in card
    # the card's YAML went through the Hub's validator like any README
    assert any(path == "/api/validate-yaml" for _, path, _ in hub.requests)


def test_cli_push_to_hub_after_training(tiny_model_dir, hub, tmp_path):
    from macft.cli import build_app
    from macft.run_dir import file_sha256

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": f" {w}!"}) + "\n"
                            for w in ("apple", "pear", "plum", "fig", "kiwi", "lime", "date", "yuzu")))
    run = tmp_path / "run"
    result = CliRunner().invoke(build_app(), [
        "sft", "--model", str(tiny_model_dir("llama")), "--data", str(data), "--iters", "2", "--batch-size", "4",
        "--save-every", "1", "--adapter-path", str(run), "--push-to-hub", "someone/sft-run"])
    assert result.exit_code == 0, result.output
    assert "Uploaded to" in result.output

    files = hub.uploaded()
    assert {"adapters.safetensors", "adapter_model.safetensors", "adapter_config.json", "run.json",
            "metrics.jsonl", "README.md"} <= set(files)
    assert not any(name.startswith("checkpoints/") for name in files)  # checkpoints stay local
    assert (run / "checkpoints").is_dir()
    card = files["README.md"].decode()
    last_loss = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(line)][-1]["loss"]
    assert "| algorithm | sft |" in card and "- sft" in card
    assert f"`train.jsonl` sha256 `{file_sha256(data)}`" in card
    assert f"| final loss | {last_loss:.6g} |" in card
    assert "| steps | 2 |" in card


def test_offline_push_is_a_clear_error(tiny_model_dir, monkeypatch, tmp_path):
    from huggingface_hub import constants

    from macft.hub import HubError, push_folder

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(HubError, match="offline"):
        push_folder(tmp_path, "someone/repo")
    with pytest.raises(HubError, match="repo id like user/name"):
        push_folder(tmp_path, "not a repo")


def test_push_to_hub_merged(small_vocab_model_dir, hub):
    import numpy as np
    from safetensors.numpy import load

    model, tokenizer = FastLanguageModel.from_pretrained(str(small_vocab_model_dir("llama")))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    model.push_to_hub_merged("someone/merged", tokenizer, save_method="merged_16bit")
    files = hub.uploaded()
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(files)
    assert "adapter_config.json" not in files
    weights = load(files["model.safetensors"])
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == np.float16
    assert json.loads(files["config.json"])["torch_dtype"] == "float16"
    assert files["README.md"].decode().startswith("---\nlibrary_name: transformers\n")
