"""Longtail introspection (introspect.py), offline.

The transformers paths run tiny random-weight models (LLaVA-NeXT, Llama) saved with save_pretrained
and loaded by path, as a user loads llava-hf/llava-v1.6-mistral-7b-hf: the text they write is
garbage, but shapes, batching, chat templates and parsing are real. The endpoint path talks to a
real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions protocol and can be told to
misbehave. Image folders are made here: a few solid-colour PNGs in class folders and a metadata.jsonl
(a Hugging Face imagefolder), alone or as the synthetic/ folder of a train_loop.py run folder.
"""

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import introspect
import run_folder
from introspect import IntrospectError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["tulip", "sweet pea"]
# (file_name, label, signal, colour, size): three images per class with distinct signals; sizes differ so
# that a LLaVA-NeXT batch needs a different number of image tokens per row (padding is real).
IMAGES = [
    ("000-tulip/t0.png", 0, 0.90, (200, 30, 30), (40, 32)),
    ("000-tulip/t1.png", 0, 0.10, (30, 200, 30), (32, 32)),
    ("000-tulip/t2.png", 0, 0.50, (30, 30, 200), (32, 40)),
    ("001-sweet_pea/p0.png", 1, 0.20, (200, 200, 30), (32, 32)),
    ("001-sweet_pea/p1.png", 1, 0.70, (30, 200, 200), (40, 32)),
    ("001-sweet_pea/p2.png", 1, 0.40, (200, 30, 200), (32, 32)),
]
COLOURS = {file: colour for file, _, _, colour, _ in IMAGES}


def make_run(folder, with_class_name=True, file_names=None):
    """An image folder: IMAGES as PNGs plus metadata.jsonl in the generator's format; file_names (one
    per image) replaces IMAGES' names."""
    folder = Path(folder)
    file_names = file_names or [file for file, *_ in IMAGES]
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, (file, (_, label, signal, colour, size)) in enumerate(zip(file_names, IMAGES)):
            (folder / file).parent.mkdir(exist_ok=True)
            Image.new("RGB", size, colour).save(folder / file)
            row = {"file_name": file, "label": label, "prompt": f"a photo of a {CLASSES[label]}", "seed": i,
                   "w": 2.0, "signal": signal}
            if with_class_name:
                row["class_name"] = CLASSES[label]
            f.write(json.dumps(row) + "\n")
    return folder


def make_train_loop_run(run):
    """A train_loop.py run folder: config.json, and IMAGES in synthetic/ named as train_loop.py names them."""
    make_run(run / "synthetic", file_names=[run_folder.image_file(label, CLASSES[label], len(CLASSES), 0, i)
                                            for i, (_, label, *_) in enumerate(IMAGES)])
    (run / "config.json").write_text(json.dumps({"dataset": "flowers"}))
    return run


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path / "run")


def log_lines(run, name="descriptions.jsonl"):
    path = Path(run) / "introspection" / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_descriptions(run, per_class=3):
    """descriptions.jsonl as `describe` writes it, without running a VLM."""
    images, folder = run_folder.introspection_paths(run)
    rows = introspect.select_hard_images(introspect.read_image_rows(images), per_class)
    folder.mkdir(exist_ok=True)
    introspect.append_log(folder / "descriptions.jsonl", [
        {**r, "description": f"A {r['class_name']} with wilted petals, seen from below against a dark "
                             f"stormy sky; petals wilted and blurry ({r['file_name']})."} for r in rows])


# ---------------------------------------------------------------------------------------------
# Tiny offline transformers models.

# A Mistral-like chat template: handles text-only and image+text user turns and assistant turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if m['role'] == 'user' %} [/INST]{% else %}{{ eos_token }}{% endif %}{% endfor %}"
)


def tiny_tokenizer():
    """A byte-level tokenizer (every byte one token, so any text encodes) with <image> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, chat_template=CHAT_TEMPLATE)


def tiny_text_config(tokenizer):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def tiny_vlm_path(tmp_path_factory):
    """LLaVA-NeXT with a 28 px CLIP tower (2x2 patches of 14 px) and 28/56 px grid pinpoints, on disk."""
    import torch
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor)
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    pinpoints = [[28, 56], [56, 28], [56, 56]]
    tokenizer = tiny_tokenizer()
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                 image_grid_pinpoints=pinpoints)
    # num_additional_image_tokens=1: the CLS token that CLIP adds, as in llava-hf's processors.
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16),
        text_config=tiny_text_config(tokenizer), image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llava")
    LlavaNextForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llm_path(tmp_path_factory):
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(tiny_text_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def counting(backend):
    """Wrap a backend to record the size of each call."""
    calls = []

    class Counted:
        batch_size = backend.batch_size

        def __call__(self, *args):
            calls.append(len(args[0]))
            return backend(*args)

    return Counted(), calls


def test_llava_describes_hardest_images_batched_and_resumes(tiny_vlm_path, run_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    describer = introspect.make_describer(vlm=str(tiny_vlm_path), device="cpu", batch_size=2)
    assert type(describer.processor).__name__ == "LlavaNextProcessor"
    describer.max_new_tokens = 6
    counted, calls = counting(describer)
    out = introspect.describe(run_dir, counted, per_class=2)

    records = log_lines(run_dir)
    # The two highest-signal images of each class, class by class, highest first.
    assert [r["file_name"] for r in records] == ["000-tulip/t0.png", "000-tulip/t2.png", "001-sweet_pea/p1.png",
                                                 "001-sweet_pea/p2.png"]
    assert calls == [2, 2]
    assert all(isinstance(r["description"], str) and r["class_name"] == CLASSES[r["label"]] for r in records)
    assert not any("generated to show" in r["description"] for r in records)  # the answer only, not the question
    assert out == run_dir / "introspection" / "descriptions.jsonl"

    # Re-running does no model work; asking for more describes only the new ones.
    introspect.describe(run_dir, counted, per_class=2)
    assert calls == [2, 2]
    introspect.describe(run_dir, counted, per_class=3)
    assert calls == [2, 2, 2] and len(log_lines(run_dir)) == 6


def test_llava_batch_matches_single_images(tiny_vlm_path, monkeypatch):
    """Left padding: an image described in a batch with a larger one reads the same as alone."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    describer = introspect.make_describer(vlm=str(tiny_vlm_path), device="cpu")
    describer.max_new_tokens = 5
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (40, 32), (30, 30, 200))]
    questions = ["Describe a tulip.", "Describe a sweet pea, please."]
    batched = describer(images, questions)
    assert batched == [describer([im], [q])[0] for im, q in zip(images, questions)]


def test_causal_lm_writes_prefixed_prompts(tiny_llm_path, run_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_descriptions(run_dir)
    writer = introspect.make_writer(llm=str(tiny_llm_path), device="cpu", batch_size=4)
    writer.max_new_tokens = 8
    counted, calls = counting(writer)
    replies = counted(["short request", "a much longer request " * 5], ["A photo of tulip that"] * 2)
    assert len(replies) == 2 and all(r.startswith("A photo of tulip that") for r in replies)
    assert not any("request" in r for r in replies)  # the continuation only, not the chat

    try:
        path = introspect.summarise(run_dir, counted, prompts_per_class=40)
    except IntrospectError as e:  # random weights can write an empty sentence; then every reply says why
        assert "no reply could be made into a prompt" in str(e)
        path = None
    summaries = log_lines(run_dir, "summaries.jsonl")
    assert calls == [2, 4, 2] and len(summaries) == 6
    for s in summaries:
        assert s["reply"].startswith(f"A photo of {s['class_name']} that")
        refined = s["refined_prompt"]
        assert refined is None or refined.startswith(f"A photo of {s['class_name']} that ")
        assert (refined is None) == ("rejected" in s)
    if path is not None:
        assert introspect.load_refined_prompts(path, CLASSES)


# ---------------------------------------------------------------------------------------------
# The OpenAI-compatible endpoint, served for real on 127.0.0.1.

class ChatServer(ThreadingHTTPServer):
    daemon_threads = True  # a handler still sleeping through a timeout test must not block shutdown

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.faults = []      # one fault per coming request, consumed in order; then "ok"
        self.requests = []    # (headers, body) of every request that asked for something

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ChatHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        server.requests.append((dict(self.headers), body))
        fault = server.faults.pop(0) if server.faults else "ok"
        if fault == "slow":
            time.sleep(1.5)
        if fault in ("500", "401"):
            return self.reply(int(fault), b'{"error": {"message": "server says no"}}')
        if fault == "nonjson":
            return self.reply(200, b"<html>gateway error</html>")
        if fault == "nochoices":
            return self.reply(200, b'{"id": "x", "object": "chat.completion"}')
        content = body["messages"][0]["content"]
        if isinstance(content, list):  # a VLM request: describe the image by its colour
            image = decode_image(content)
            text = f"A flower in rgb {image.getpixel((0, 0))}, {image.size[0]}x{image.size[1]}, with wilted petals."
        else:  # a summary request: a chatty reply the client must repair
            name = re.search(r'starts exactly with "A photo of (.+?) that"', content).group(1)
            detail = re.search(r"\((.+?)\)", content).group(1)  # the colour, or the file name
            text = f'Sure! Here it is:\n"a photo of a {name} that is tinted {detail} and wilted." Hope it helps.'
        self.reply(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode())

    def reply(self, status, data):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout test)
            pass


def decode_image(content):
    url = next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


@pytest.fixture
def server():
    server = ChatServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_endpoint_describe_summarise_report(server, run_dir, monkeypatch):
    monkeypatch.setenv("LTG_API_KEY", "secret-key")
    describer = introspect.make_describer(vlm_url=server.url, model="my-llava", timeout=5)
    introspect.describe(run_dir, describer, per_class=2)
    assert len(server.requests) == 4
    headers, body = server.requests[0]
    assert headers["Authorization"] == "Bearer secret-key" and body["model"] == "my-llava"
    image = decode_image(body["messages"][0]["content"])
    assert image.size == (40, 32) and image.getpixel((0, 0)) == COLOURS["000-tulip/t0.png"]
    assert "tulip" in body["messages"][0]["content"][0]["text"]

    writer = introspect.make_writer(llm_url=server.url + "/chat/completions", timeout=5)
    path = introspect.summarise(run_dir, writer, prompts_per_class=40)
    prompts = introspect.load_refined_prompts(path, CLASSES)
    assert prompts == {
        "tulip": ["A photo of tulip that is tinted 200, 30, 30 and wilted.",
                  "A photo of tulip that is tinted 30, 30, 200 and wilted."],
        "sweet pea": ["A photo of sweet pea that is tinted 30, 200, 200 and wilted.",
                      "A photo of sweet pea that is tinted 200, 30, 200 and wilted."]}
    # The request carried keywords taken from the description, beside the class name.
    assert "Keywords: tulip, flower, rgb" in server.requests[4][1]["messages"][0]["content"]

    md, png = introspect.report(run_dir)
    assert md.exists() and png.exists()


def test_introspect_run_does_all_three_steps(server, run_dir):
    path = introspect.introspect_run(run_dir, vlm_url=server.url, llm_url=server.url, vlm_model="v",
                                     llm_model="l", per_class=1, prompts_per_class=1, timeout=5)
    assert [body["model"] for _, body in server.requests] == ["v", "v", "l", "l"]
    assert introspect.load_refined_prompts(path, CLASSES) == {
        "tulip": ["A photo of tulip that is tinted 200, 30, 30 and wilted."],
        "sweet pea": ["A photo of sweet pea that is tinted 30, 200, 200 and wilted."]}
    assert (run_dir / "introspection" / "contact_sheet.png").exists()


@pytest.mark.parametrize("fault, message", [
    ("500", "HTTP 500"),
    ("401", "HTTP 401 Unauthorized (check the API key"),
    ("nonjson", "reply is not JSON: <html>gateway error</html>"),
    ("nochoices", "reply has no choices[0].message.content"),
    ("slow", "no reply within 0.3 s"),
])
def test_endpoint_failure_is_clear_and_a_rerun_resumes(server, run_dir, fault, message):
    describer = introspect.make_describer(vlm_url=server.url, timeout=0.3)
    server.faults = ["ok", "ok", fault]
    with pytest.raises(IntrospectError, match=re.escape(message)) as failure:
        introspect.describe(run_dir, describer, per_class=3)
    assert "\n" not in str(failure.value)
    done = log_lines(run_dir)  # every line whole: the two answered before the fault
    assert [r["file_name"] for r in done] == ["000-tulip/t0.png", "000-tulip/t2.png"]

    sent = len(server.requests)
    introspect.describe(run_dir, describer, per_class=3)
    assert len(server.requests) - sent == 4  # only the four not yet described
    assert sorted(r["file_name"] for r in log_lines(run_dir)) == sorted(COLOURS)


def test_summarise_failure_writes_no_prompt_file_and_resumes(server, run_dir):
    write_descriptions(run_dir)
    writer = introspect.make_writer(llm_url=server.url, timeout=5)
    server.faults = ["ok", "500"]
    with pytest.raises(IntrospectError, match="HTTP 500"):
        introspect.summarise(run_dir, writer)
    assert not (run_dir / "introspection" / "refined_prompts.json").exists()
    assert len(log_lines(run_dir, "summaries.jsonl")) == 1
    sent = len(server.requests)
    introspect.summarise(run_dir, writer)
    assert len(server.requests) - sent == 5
    assert sum(map(len, json.loads((run_dir / "introspection" / "refined_prompts.json").read_text()).values())) == 6


def test_torn_last_log_line_is_redone(server, run_dir):
    describer = introspect.make_describer(vlm_url=server.url, timeout=5)
    introspect.describe(run_dir, describer, per_class=1)
    log = run_dir / "introspection" / "descriptions.jsonl"
    whole = log.read_text().splitlines(keepends=True)
    log.write_text(whole[0] + whole[1][:20])  # a crash in the middle of the second append
    sent = len(server.requests)
    introspect.describe(run_dir, describer, per_class=1)
    assert len(server.requests) - sent == 1
    assert [r["file_name"] for r in log_lines(run_dir)] == ["000-tulip/t0.png", "001-sweet_pea/p1.png"]


# ---------------------------------------------------------------------------------------------
# Prompts: repair, de-duplication, validation of a prompt file.

@pytest.mark.parametrize("reply", [
    "A photo of tulip that is wilted.",
    "  a photo of TULIP that is wilted",
    'Sure! Here is the sentence: "A photo of a tulip that is wilted." Let me know if you need more.',
    "**A photo of the tulip that is wilted.**\nIt is unusual because...",
    "A photo of tulips that is wilted!",
])
def test_refine_prompt_repairs(reply):
    assert introspect.refine_prompt(reply, "tulip") == "A photo of tulip that is wilted."


@pytest.mark.parametrize("reply, why", [
    ("A tulip that is wilted.", "has no 'A photo of tulip that ...'"),
    ("A photo of rose that is wilted.", "has no"),
    ("A photo of tulip that.", "says nothing after"),
    ("A photo of tulip that " + "is very " * 60, "is 502 characters, over 300"),
])
def test_refine_prompt_rejects(reply, why):
    with pytest.raises(IntrospectError, match=re.escape(why)):
        introspect.refine_prompt(reply, "tulip")


def test_refine_prompt_counts_clip_tokens_with_a_tokenizer():
    reply = "A photo of tulip that is " + "x" * 60 + "."  # 86 characters, one token each
    assert introspect.refine_prompt(reply, "tulip") == reply
    with pytest.raises(IntrospectError, match=re.escape("is 86 CLIP tokens, over 77")):
        introspect.refine_prompt(reply, "tulip", tiny_tokenizer())


def test_refined_prompts_deduplicates_and_keeps_the_hardest():
    summaries = [{"class_name": "tulip", "signal": s, "refined_prompt": p} for s, p in [
        (0.1, "A photo of tulip that is red."), (0.9, "A photo of tulip that  is RED."),
        (0.5, "A photo of tulip that is blue."), (0.7, None), (0.3, "A photo of tulip that is green.")]]
    assert introspect.refined_prompts(summaries, 2) == {
        "tulip": ["A photo of tulip that  is RED.", "A photo of tulip that is blue."]}
    # With a tokenizer (one token per byte here) prompts logged earlier are held to 77 tokens too.
    long = "A photo of tulip that is " + "x" * 60
    summaries.append({"class_name": "tulip", "signal": 1.0, "refined_prompt": long})
    assert introspect.refined_prompts(summaries, 2, tiny_tokenizer())["tulip"][0] == "A photo of tulip that  is RED."
    assert introspect.refined_prompts(summaries, 2)["tulip"][0] == long


def write_prompts(tmp_path, data):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(data))
    return path


def test_load_refined_prompts_accepts_a_valid_file(tmp_path):
    path = write_prompts(tmp_path, {"sweet pea": ["A photo of sweet pea that is pale."], "tulip": ["x", "y"]})
    assert list(introspect.load_refined_prompts(path, CLASSES).items()) == [
        ("tulip", ["x", "y"]), ("sweet pea", ["A photo of sweet pea that is pale."])]


@pytest.mark.parametrize("data, message", [
    ({"rose": ["A photo of rose that is red."]}, "unknown class 'rose'; valid classes: tulip, sweet pea"),
    ({"tulip": ["ok", "  "]}, "class 'tulip' prompt 1 is empty"),
    ({"tulip": []}, "class 'tulip' needs a non-empty list of prompts"),
    ({"tulip": ["x" * 301]}, "class 'tulip' prompt 0 is 301 characters, over 300"),
    (["tulip"], "expected a JSON object"),
])
def test_load_refined_prompts_refuses(tmp_path, data, message):
    with pytest.raises(IntrospectError, match=re.escape(message)):
        introspect.load_refined_prompts(write_prompts(tmp_path, data), CLASSES)


def test_load_refined_prompts_counts_clip_tokens_with_a_tokenizer(tmp_path):
    tokenizer = tiny_tokenizer()  # one token per byte: 100 characters are 100 tokens
    path = write_prompts(tmp_path, {"tulip": ["x" * 70, "y" * 100]})
    assert introspect.load_refined_prompts(path, CLASSES)  # under 300 characters
    with pytest.raises(IntrospectError, match=re.escape("class 'tulip' prompt 1 is 100 CLIP tokens, over 77")):
        introspect.load_refined_prompts(path, CLASSES, tokenizer)


# ---------------------------------------------------------------------------------------------
# Report and command line.

def test_contact_sheet_layout(run_dir):
    write_descriptions(run_dir)
    (run_dir / "introspection" / "refined_prompts.json").write_text(json.dumps(
        {"tulip": ["A photo of tulip that is wilted."]}))
    md, png = introspect.report(run_dir, images_per_class=2)

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sheet = Image.open(png).convert("RGB")
    t, c, w = introspect.THUMB, introspect.CAPTION, introspect.TEXT_WIDTH
    assert sheet.size == (2 * t + w, 2 * (t + c))
    # Row per class in class order, thumbnails highest signal first: the centre of each cell holds its image.
    expected = [["000-tulip/t0.png", "000-tulip/t2.png"], ["001-sweet_pea/p1.png", "001-sweet_pea/p2.png"]]
    for r, files in enumerate(expected):
        for col, file in enumerate(files):
            pixel = sheet.getpixel((col * t + t // 2, r * (t + c) + t // 2))
            assert max(abs(a - b) for a, b in zip(pixel, COLOURS[file])) < 8, (r, col, file, pixel)
    text_panel = sheet.crop((2 * t, 0, 2 * t + w, t))
    assert text_panel.getextrema() != ((255, 255),) * 3  # the class's words are drawn there

    text = md.read_text()
    assert "## tulip" in text and "## sweet pea" in text and "A photo of tulip that is wilted." in text
    assert "![](<../000-tulip/t0.png>)" in text and "wilted" in text


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "introspect.py"), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)


def test_cli_end_to_end_and_resume(server, run_dir, capsys):
    assert introspect.main(["describe", str(run_dir), "--vlm-url", server.url, "--per-class", "2"]) == 0
    assert introspect.main(["summarise", str(run_dir), "--llm-url", server.url, "--prompts-per-class", "1"]) == 0
    assert introspect.main(["report", str(run_dir)]) == 0
    prompts = json.loads((run_dir / "introspection" / "refined_prompts.json").read_text())
    assert {k: len(v) for k, v in prompts.items()} == {"tulip": 1, "sweet pea": 1}
    sent = len(server.requests)
    assert introspect.main(["describe", str(run_dir), "--vlm-url", server.url, "--per-class", "2"]) == 0
    assert len(server.requests) == sent
    assert sorted(p.name for p in (run_dir / "introspection").iterdir()) == [
        "contact_sheet.png", "descriptions.jsonl", "refined_prompts.json", "report.md", "summaries.jsonl"]


def test_cli_class_names_file(server, tmp_path):
    run = make_run(tmp_path / "run", with_class_name=False)
    (tmp_path / "names.txt").write_text("tulip\nsweet pea\n")
    assert introspect.main(["describe", str(run), "--vlm-url", server.url, "--per-class", "1",
                            "--class-names", str(tmp_path / "names.txt")]) == 0
    assert [r["class_name"] for r in log_lines(run)] == CLASSES


@pytest.mark.parametrize("edit, args, message", [
    (None, ["describe", "{run}/missing", "--vlm-url", "http://127.0.0.1:9"],
     "run folder '{run}/missing' does not exist"),
    (None, ["describe", "{run}", "--vlm-url", "ftp://host"], "endpoint URL 'ftp://host' must start with http"),
    (None, ["describe", "{run}", "--vlm-url", "http://127.0.0.1:9", "--per-class", "0"],
     "'0' is not an integer >= 1"),
    (None, ["describe", "{run}", "--vlm", "x", "--vlm-url", "http://127.0.0.1:9"], "not allowed with argument"),
    (None, ["summarise", "{run}", "--llm-url", "http://127.0.0.1:9"], "run `introspect.py describe` first"),
    (None, ["report", "{run}"], "run `introspect.py describe` first"),
    (('"signal": 0.9', '"signal": "high"'), ["describe", "{run}", "--vlm-url", "http://127.0.0.1:9"],
     'metadata.jsonl:1: "signal" is \'high\'; expected a finite number'),
    ((', "class_name": "tulip"', ""), ["describe", "{run}", "--vlm-url", "http://127.0.0.1:9"],
     'metadata.jsonl:1: no "class_name"; pass the class names (--class-names FILE)'),
    (("000-tulip/t0.png", "000-tulip/gone.png"), ["describe", "{run}", "--vlm-url", "http://127.0.0.1:9"],
     "image '000-tulip/gone.png' listed in {run}/metadata.jsonl is missing"),
    (("000-tulip/t1.png", "000-tulip/t0.png"), ["describe", "{run}", "--vlm-url", "http://127.0.0.1:9"],
     "metadata.jsonl:2: image '000-tulip/t0.png' is listed twice"),
    (('"label": 1', '"label": -1'), ["describe", "{run}", "--vlm-url", "http://127.0.0.1:9"],
     'metadata.jsonl:4: "label" is -1; expected a class index (int >= 0)'),
])
def test_cli_bad_input_one_line_error_nothing_written(run_dir, edit, args, message):
    metadata = run_dir / "metadata.jsonl"
    if edit is not None:
        metadata.write_text(metadata.read_text().replace(*edit, 1))
    result = run_cli(*[a.format(run=run_dir) for a in args])
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message.format(run=run_dir) in error_lines[0], result.stderr
    assert not any((run_dir / "introspection").glob("*.*"))  # no file, not even a temporary one


@pytest.mark.parametrize("metadata, message", [
    ("\n", "{run}/metadata.jsonl lists no images"),
    (None, "no {run}/metadata.jsonl; expected a folder holding metadata.jsonl or a train_loop.py run folder with "
           "generated images"),
])
def test_cli_folder_without_images(run_dir, capsys, metadata, message):
    (run_dir / "metadata.jsonl").unlink()
    if metadata is not None:
        (run_dir / "metadata.jsonl").write_text(metadata)
    assert introspect.main(["describe", str(run_dir), "--vlm-url", "http://127.0.0.1:9"]) == 1
    assert capsys.readouterr().err == f"introspect.py describe: error: {message.format(run=run_dir)}\n"


def test_cli_unwritable_introspection_file_is_a_one_line_error(run_dir, capsys):
    write_descriptions(run_dir)
    (run_dir / "introspection" / "contact_sheet.png").mkdir()
    assert introspect.main(["report", str(run_dir)]) == 1
    assert capsys.readouterr().err.startswith(
        f"introspect.py report: error: cannot write {run_dir}/introspection/contact_sheet.png: ")


def test_cli_takes_a_train_loop_run_folder(server, tmp_path):
    """train_loop.py keeps its images in RUN/synthetic, a dataset that loads as it is (any subfolder
    would be a class): the CLI takes RUN itself and writes its files to RUN/introspection."""
    run = make_train_loop_run(tmp_path / "run")
    dataset = {path: path.stat().st_mtime_ns for path in (run / "synthetic").rglob("*")}
    assert introspect.main(["describe", str(run), "--vlm-url", server.url, "--per-class", "1"]) == 0
    assert introspect.main(["summarise", str(run), "--llm-url", server.url]) == 0
    assert introspect.main(["report", str(run)]) == 0
    assert [r["file_name"] for r in log_lines(run)] == ["000-tulip/r00_000000.png", "001-sweet_pea/r00_000004.png"]
    assert sorted(p.name for p in (run / "introspection").iterdir()) == [
        "contact_sheet.png", "descriptions.jsonl", "refined_prompts.json", "report.md", "summaries.jsonl"]
    assert {path: path.stat().st_mtime_ns for path in (run / "synthetic").rglob("*")} == dataset  # untouched


@pytest.mark.parametrize("layout", ["image folder", "train_loop.py run folder"])
def test_report_links_resolve_to_the_images(tmp_path, layout):
    run = make_run(tmp_path / "run") if layout == "image folder" else make_train_loop_run(tmp_path / "run")
    write_descriptions(run)
    md, _ = introspect.report(run)
    links = re.findall(r"!\[\]\(<(.+?)>\)", md.read_text())
    assert len(links) == len(IMAGES) and all((md.parent / link).is_file() for link in links)
    first = "../000-tulip/t0.png" if layout == "image folder" else "../synthetic/000-tulip/r00_000000.png"
    assert links[0] == first
