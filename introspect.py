"""Longtail introspection: say in words what the predictor finds hard, and turn it into prompts.

The paper's recipe (Hayden et al., ICML 2025): LLaVA-1.6 describes the LTG images with the highest
longtail signal; an LLM condenses each description plus keywords into one sentence that starts
"A photo of <Class> that ..."; P = 40 such refined prompts per class then drive generation.

    IMAGES/metadata.jsonl                     one row per generated image (written by the generator)
      -> describe  -> INTROSPECTION/descriptions.jsonl   one line per described image
      -> summarise -> INTROSPECTION/summaries.jsonl      one line per LLM reply
                      INTROSPECTION/refined_prompts.json {"class_name": [prompt, ...]}
      -> report    -> INTROSPECTION/report.md + contact_sheet.png

For a train_loop.py run folder RUN, IMAGES is RUN/synthetic and INTROSPECTION is RUN/introspection
(synthetic/ stays a dataset that loads as it is); for any other FOLDER holding a metadata.jsonl they
are FOLDER and FOLDER/introspection (run_folder.introspection_paths).

metadata.jsonl is a Hugging Face imagefolder's: one row per image, {"file_name":
"000-tulip/r00_000000.png" (relative to IMAGES), "label": 0, "class_name": "tulip" (or taken from a
class-names list), "prompt": str, "seed": int, "w": float, "signal": float, ...}, read and checked
by run_folder.read_metadata.

Both model steps have two backends: transformers (LLaVA-NeXT for describing, any chat causal LM
for summarising), or an OpenAI-compatible chat-completions endpoint (a local server or a hosted
API; key from an environment variable). The .jsonl logs are append-only, so a crash loses at most
the batch in flight and a re-run skips what is already done; every other file is replaced
atomically (run_folder.write_atomic).

train_loop.py reads the prompt file through `load_refined_prompts`; `introspect_run` runs all
three steps for an automatic mode after a generation round.
"""

import argparse
import base64
import gc
import http.client
import io
import json
import math
import os
import re
import sys
import textwrap
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

import run_folder

PROMPTS_PER_CLASS = 40  # P in the paper
CLIP_MAX_TOKENS = 77    # Stable Diffusion's text encoder context, BOS and EOS included
MAX_PROMPT_CHARS = 300  # without a tokenizer: about the most text that fits in 77 CLIP tokens
DEFAULT_VLM = "llava-hf/llava-v1.6-mistral-7b-hf"
DEFAULT_ENDPOINT_LLM = "gpt-4o"  # the paper's summariser; only a name sent to --llm-url

DESCRIBE_QUESTION = (
    "This image was generated to show a {class_name}. Describe it in detail: how the {class_name} "
    "looks, its pose and viewpoint, the background, the lighting, and anything unusual about it."
)
SUMMARISE_REQUEST = (
    "Description of an image of a {class_name}:\n{description}\n\nKeywords: {keywords}\n\n"
    'Write one sentence, at most 40 words, that starts exactly with "{prefix}" and says what makes '
    "this image unusual, using the keywords. Reply with that sentence only."
)
# Words that say nothing about why an image is hard; left out of the keywords.
STOPWORDS = frozenset("""
    a about above after again against all also an and any appears are around as at be because been
    being below between both but by can could depicted depicts describe detail details do does down
    during each few for from further has have having here how however image in into is it its itself
    just like looks may more most near no not of off on one only or other out over own photo picture
    seems shown shows similar so some such than that the their them then there these this those
    through to too under up very visible was what when where which while who with would
""".split())


class IntrospectError(ValueError):
    """Bad input or a failed backend. The message is one line, meant for the user.

    A ValueError so that callers which validate arguments (train_loop's --refined-prompts) can treat
    a bad prompt file like any other bad argument value.
    """


# ---------------------------------------------------------------------------------------------
# Files: metadata.jsonl in, append-only logs.

def read_image_rows(images, class_names=None):
    """The rows of images/metadata.jsonl (run_folder.read_metadata); an absent or empty file is an error.

    class_names (list[str], indexed by label) supplies "class_name" where a row lacks it.
    """
    path = Path(images) / "metadata.jsonl"
    rows = run_folder.read_metadata(path, class_names)
    if not rows:
        raise IntrospectError(f"{path} lists no images" if path.exists() else
                              f"no {path}; expected a folder holding metadata.jsonl or a train_loop.py run folder "
                              "with generated images")
    return rows


def read_class_names(path):
    """Class names from a JSON list or a text file with one name per line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise IntrospectError(f"cannot read class names from {path}: {e.strerror}") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except ValueError:
            raise IntrospectError(f"{path}: not a JSON list of class names") from None
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise IntrospectError(f"{path}: expected a non-empty list of non-empty class names")
    return names


def read_log(path):
    """The records of an append-only JSONL log ([] if absent).

    A crash during an append can leave a torn last line; it is dropped (and the file rewritten
    without it) so that the re-run redoes that record instead of failing on it.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not line.endswith("\n") or not isinstance(record, dict):
                raise ValueError
        except ValueError:
            if i < len(lines) - 1:
                raise IntrospectError(f"{path}:{i + 1}: corrupt record; fix or delete the file") from None
            print(f"introspect: dropping a torn last line of {path} (an interrupted run)", file=sys.stderr)
            run_folder.write_atomic(path, "".join(lines[:i]).encode("utf-8"))
            break
        records.append(record)
    return records


def append_log(path, records):
    """Append records (list[dict]) as JSON lines and flush them to disk before returning."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def _batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def _open_rgb(path):
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise IntrospectError(f"cannot read image {path}: {run_folder.clip(e)}") from None


# ---------------------------------------------------------------------------------------------
# Step 1: describe the hardest images of each class.

def select_hard_images(rows, per_class):
    """The per_class rows with the highest signal in each class; ordered by class, then signal (high first)."""
    ranked = sorted(rows, key=lambda r: (r["label"], -r["signal"], r["file_name"]))
    taken = Counter()
    chosen = []
    for row in ranked:
        if taken[row["label"]] < per_class:
            taken[row["label"]] += 1
            chosen.append(row)
    return chosen


def describe(run_dir, describer, per_class=PROMPTS_PER_CLASS, class_names=None):
    """Describe the per_class hardest images of each class; return the path of descriptions.jsonl.

    run_dir: a train_loop.py run folder or a folder holding metadata.jsonl (run_folder.introspection_paths).
    describer: a VLM backend (LlavaDescriber, EndpointDescriber). Each record appended:
    {"file_name", "label", "class_name", "signal", "prompt", "w", "description"}. Images already in
    the log are skipped, so an interrupted run resumes where it stopped.
    """
    if per_class < 1:
        raise IntrospectError(f"--per-class is {per_class}; expected an integer >= 1")
    images, folder = run_folder.introspection_paths(run_dir)
    chosen = select_hard_images(read_image_rows(images, class_names), per_class)
    for row in chosen:  # fail before any model work, not halfway through
        if not (images / row["file_name"]).is_file():
            raise IntrospectError(f"image {row['file_name']!r} listed in {images / 'metadata.jsonl'} is missing")
    out = folder / "descriptions.jsonl"
    folder.mkdir(exist_ok=True)
    done = {r["file_name"] for r in read_log(out)}
    todo = [row for row in chosen if row["file_name"] not in done]
    for batch in _batches(todo, describer.batch_size):
        pictures = [_open_rgb(images / row["file_name"]) for row in batch]
        questions = [DESCRIBE_QUESTION.format(class_name=row["class_name"]) for row in batch]
        texts = describer(pictures, questions)
        append_log(out, [{"file_name": row["file_name"], "label": row["label"], "class_name": row["class_name"],
                          "signal": row["signal"], "prompt": row.get("prompt"), "w": row.get("w"),
                          "description": " ".join(text.split())} for row, text in zip(batch, texts)])
    print(f"introspect: described {len(todo)} images ({len(chosen) - len(todo)} already done) -> {out}",
          file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------
# Step 2: condense each description into a refined prompt.

def keywords(description, class_name, k=5):
    """The k most frequent content words of a description (ties: first seen), without the class name."""
    skip = STOPWORDS | set(class_name.lower().split())
    words = [w for w in re.findall(r"[a-z][a-z'-]*[a-z]", description.lower()) if w not in skip and len(w) > 2]
    return [w for w, _ in Counter(words).most_common(k)]


def prompt_prefix(class_name):
    return f"A photo of {class_name} that"


def prompt_too_long(prompt, tokenizer=None):
    """Why a prompt is too long for Stable Diffusion's text encoder ("81 CLIP tokens, over 77"), or None.

    tokenizer: the pipeline's CLIPTokenizer; without one, a character limit stands in for it.
    """
    if tokenizer is not None:
        n = len(tokenizer(prompt)["input_ids"])
        return f"{n} CLIP tokens, over {CLIP_MAX_TOKENS}" if n > CLIP_MAX_TOKENS else None
    return f"{len(prompt)} characters, over {MAX_PROMPT_CHARS}" if len(prompt) > MAX_PROMPT_CHARS else None


def refine_prompt(reply, class_name, tokenizer=None):
    """Turn an LLM reply into one prompt "A photo of <class_name> that ...", or raise IntrospectError.

    Repairs what chat models commonly do: a preamble before the sentence ("Sure! Here it is: ..."),
    quotes or markdown around it, an article before the class ("A photo of a tulip that"), other
    letter case, a plural class, extra sentences or lines after it. The prefix is rewritten to the
    exact class name.
    """
    text = " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", reply).split())
    words = r"\s+".join(re.escape(w) for w in class_name.split())
    found = re.search(rf"a\s+photo\s+of\s+(?:(?:a|an|the)\s+)?{words}(?:e?s)?\s+that\b", text, re.IGNORECASE)
    if found is None:
        raise IntrospectError(f"reply for class {class_name!r} has no {prompt_prefix(class_name) + ' ...'!r}: "
                              f"{run_folder.clip(reply, 80)!r}")
    rest = text[found.end():]
    end = re.search(r"[.!?][\"'*_)\]]*(?=\s|$)", rest)  # one sentence: stop at its end, closing marks too
    rest = rest[:end.start()] if end else rest
    rest = rest.strip(" \"'`*_,;:")
    if not rest:
        raise IntrospectError(f"reply for class {class_name!r} says nothing after {prompt_prefix(class_name)!r}")
    prompt = f"{prompt_prefix(class_name)} {rest}."
    too_long = prompt_too_long(prompt, tokenizer)
    if too_long:
        raise IntrospectError(f"reply for class {class_name!r} is {too_long}: {run_folder.clip(prompt, 60)!r}")
    return prompt


def _dedup_key(prompt):
    return " ".join(prompt.lower().split()).rstrip(".")


def read_descriptions(folder):
    """The records of folder/descriptions.jsonl; none is an error (describe comes first)."""
    descriptions = read_log(Path(folder) / "descriptions.jsonl")
    if not descriptions:
        raise IntrospectError(f"no descriptions in {folder}; run `introspect.py describe` first")
    return descriptions


def summarise(run_dir, writer, prompts_per_class=PROMPTS_PER_CLASS, tokenizer=None):
    """Write one refined prompt per description; return the path of refined_prompts.json.

    writer: an LLM backend (CausalLMWriter, EndpointWriter). Each reply is logged in summaries.jsonl
    as {"file_name", "class_name", "signal", "reply", "refined_prompt"}, with "refined_prompt" null and
    "rejected" the reason when the reply cannot be repaired; logged replies are not asked again on a
    re-run (greedy decoding would only repeat them).
    refined_prompts.json keeps, per class, up to prompts_per_class distinct prompts (case and
    whitespace ignored), those of the highest-signal images first. Classes without one are left out.
    tokenizer (the generator's CLIPTokenizer, optional) rejects prompts over 77 tokens here rather
    than when train_loop loads the file.
    """
    if prompts_per_class < 1:
        raise IntrospectError(f"--prompts-per-class is {prompts_per_class}; expected an integer >= 1")
    folder = run_folder.introspection_paths(run_dir)[1]
    descriptions = read_descriptions(folder)
    log = folder / "summaries.jsonl"
    done = {r["file_name"] for r in read_log(log)}
    todo = [d for d in descriptions if d["file_name"] not in done]
    for batch in _batches(todo, writer.batch_size):
        requests = [SUMMARISE_REQUEST.format(
            class_name=d["class_name"], description=d["description"], prefix=prompt_prefix(d["class_name"]),
            keywords=", ".join([d["class_name"]] + keywords(d["description"], d["class_name"])))
            for d in batch]
        replies = writer(requests, [prompt_prefix(d["class_name"]) for d in batch])
        records = []
        for d, reply in zip(batch, replies):
            record = {"file_name": d["file_name"], "class_name": d["class_name"], "signal": d["signal"],
                      "reply": reply}
            try:
                record["refined_prompt"] = refine_prompt(reply, d["class_name"], tokenizer)
            except IntrospectError as e:
                record.update(refined_prompt=None, rejected=str(e))
                print(f"introspect: rejected: {e}", file=sys.stderr)
            records.append(record)
        append_log(log, records)
    prompts = refined_prompts(read_log(log), prompts_per_class, tokenizer)
    if not prompts:
        raise IntrospectError(f"no reply could be made into a prompt (see {log}); check the LLM")
    for name in sorted({d["class_name"] for d in descriptions} - set(prompts)):
        print(f"introspect: class {name!r} got no valid prompt; it keeps its default prompt", file=sys.stderr)
    out = folder / "refined_prompts.json"
    run_folder.write_atomic(out, (json.dumps(prompts, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f"introspect: {sum(map(len, prompts.values()))} prompts for {len(prompts)} classes -> {out}",
          file=sys.stderr)
    return out


def refined_prompts(summaries, prompts_per_class, tokenizer=None):
    """{class_name: [prompt, ...]} from summary records: distinct, highest signal first, at most P each.

    Lengths are checked again: records logged by an earlier run may predate the tokenizer.
    """
    prompts, seen = {}, set()
    for s in sorted(summaries, key=lambda s: -s["signal"]):
        name, prompt = s["class_name"], s["refined_prompt"]
        if not prompt or prompt_too_long(prompt, tokenizer):
            continue
        if (name, _dedup_key(prompt)) not in seen and len(prompts.get(name, [])) < prompts_per_class:
            seen.add((name, _dedup_key(prompt)))
            prompts.setdefault(name, []).append(prompt)
    return prompts


def load_refined_prompts(path, class_names, tokenizer=None):
    """Read and validate a refined-prompts file; return {class_name: [prompt, ...]}.

    The file is JSON: {"class_name": ["A photo of class_name that ...", ...], ...}, as `summarise`
    writes it (hand-written prompts need not use that prefix). Contract for train_loop.py's
    --refined-prompts FILE:
      - every key must be one of class_names (list[str], the dataset's classes), else
        IntrospectError naming the unknown class and listing the valid ones;
      - every class listed has at least one prompt; every prompt is a non-empty string;
      - no prompt is longer than CLIP_MAX_TOKENS (77, BOS and EOS included) when tokenizer is given
        (the pipeline's CLIPTokenizer; Stable Diffusion would silently cut the rest), otherwise no
        longer than MAX_PROMPT_CHARS (300) characters;
      - errors are IntrospectError (a ValueError) with a one-line message naming the file, the
        class and the prompt's index.
    Classes absent from the file are absent from the result: the caller keeps their default prompt.
    The result follows the order of class_names; prompts keep the file's order.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise IntrospectError(f"cannot read refined prompts {path}: {e.strerror}") from None
    except ValueError as e:
        raise IntrospectError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise IntrospectError(f"{path}: expected a JSON object {{\"class_name\": [prompt, ...]}}")
    for name, prompts in data.items():
        if name not in class_names:
            raise IntrospectError(f"{path}: unknown class {name!r}; valid classes: {', '.join(class_names)}")
        if not isinstance(prompts, list) or not prompts:
            raise IntrospectError(f"{path}: class {name!r} needs a non-empty list of prompts")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise IntrospectError(f"{path}: class {name!r} prompt {i} is empty")
            too_long = prompt_too_long(prompt, tokenizer)
            if too_long:
                raise IntrospectError(f"{path}: class {name!r} prompt {i} is {too_long}: {run_folder.clip(prompt, 60)!r}")
    return {name: data[name] for name in class_names if name in data}


# ---------------------------------------------------------------------------------------------
# Step 3: a report that puts the hard images beside the words that explain them.

THUMB = 128       # contact sheet: thumbnail side, pixels
CAPTION = 16      # the band under each thumbnail with its signal
TEXT_WIDTH = 384  # the panel right of each class's thumbnails


def class_keywords(descriptions, class_name, k=8):
    """Words that recur across a class's descriptions: in how many of them each appears, most first."""
    counts = Counter(w for d in descriptions for w in set(keywords(d["description"], class_name, k=10)))
    return [w for w, _ in counts.most_common(k)]


def report(run_dir, images_per_class=5):
    """Write introspection/report.md and contact_sheet.png; return their paths.

    Contact sheet layout: one row per described class (in class order), each row images_per_class
    thumbnails (THUMB x THUMB, highest signal first, the signal below) then a TEXT_WIDTH panel with
    the class name, its recurring keywords and its first refined prompt. Size:
    (images_per_class * THUMB + TEXT_WIDTH) x (classes * (THUMB + CAPTION)) pixels.
    """
    if images_per_class < 1:
        raise IntrospectError(f"--images-per-class is {images_per_class}; expected an integer >= 1")
    images, folder = run_folder.introspection_paths(run_dir)
    descriptions = read_descriptions(folder)
    prompts_file = folder / "refined_prompts.json"
    prompts = load_refined_prompts(prompts_file, sorted({d["class_name"] for d in descriptions})) \
        if prompts_file.exists() else {}
    by_class = {}
    for d in sorted(descriptions, key=lambda d: (d["label"], -d["signal"])):
        by_class.setdefault(d["class_name"], []).append(d)
    rows = [(name, ds, class_keywords(ds, name), prompts.get(name, [])) for name, ds in by_class.items()]

    sheet = contact_sheet(images, rows, images_per_class)
    run_folder.write_with(folder / "contact_sheet.png", lambda f: sheet.save(f, format="PNG"))
    run_folder.write_atomic(folder / "report.md", report_markdown(images, folder, rows).encode("utf-8"))
    return folder / "report.md", folder / "contact_sheet.png"


def contact_sheet(images, rows, images_per_class):
    """The contact sheet as a PIL image of the described images in the folder `images`;
    rows: [(class_name, descriptions, keywords, prompts)]."""
    row_height = THUMB + CAPTION
    sheet = Image.new("RGB", (images_per_class * THUMB + TEXT_WIDTH, len(rows) * row_height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(12)
    for r, (name, descriptions, words, prompts) in enumerate(rows):
        top = r * row_height
        for c, d in enumerate(descriptions[:images_per_class]):
            image = _open_rgb(images / d["file_name"])
            image.thumbnail((THUMB, THUMB))
            sheet.paste(image, (c * THUMB + (THUMB - image.width) // 2, top + (THUMB - image.height) // 2))
            draw.text((c * THUMB + 4, top + THUMB + 1), f"signal {d['signal']:.3f}", fill="black", font=font)
        text = "\n".join([name, "keywords: " + (", ".join(words) or "-"), ""]
                         + textwrap.wrap(prompts[0] if prompts else descriptions[0]["description"], 58)[:6])
        draw.multiline_text((images_per_class * THUMB + 8, top + 6), text, fill="black", font=font, spacing=3)
        draw.line([(0, top + row_height - 1), (sheet.width, top + row_height - 1)], fill="gray")
    return sheet


def report_markdown(images, folder, rows):
    """report.md, written to `folder`: it links each described image of the folder `images` by its
    path relative to `folder`."""
    lines = [f"# Longtail introspection: {folder.resolve().parent.name}", "",
             "The images the predictor found hardest (highest longtail signal), what a vision-language model "
             "saw in them, and the refined prompts written from that.", "",
             "![contact sheet](contact_sheet.png)", ""]
    for name, descriptions, words, prompts in rows:
        lines += [f"## {name}", "", f"{len(descriptions)} images described. Recurring words: "
                  f"{', '.join(words) or '-'}.", "", f"Refined prompts ({len(prompts)}):", ""]
        lines += [f"- {p}" for p in prompts] or ["- none yet (run `introspect.py summarise`)"]
        lines += ["", "| image | signal | w | description |", "|---|---|---|---|"]
        for d in descriptions:
            link = os.path.relpath(images / d["file_name"], folder)
            lines.append(f"| ![](<{link}>) | {d['signal']:.3f} | {d.get('w')} | {d['description'].replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def introspect_run(run_dir, vlm=None, vlm_url=None, llm=None, llm_url=None, vlm_model=None, llm_model=None,
                   per_class=PROMPTS_PER_CLASS, prompts_per_class=PROMPTS_PER_CLASS, class_names=None,
                   clip_tokenizer=None, **backend_options):
    """Describe, summarise and report on a run folder (resumable); return the path of refined_prompts.json.

    The automatic mode after a generation round: train_loop calls this on its run folder, then
    passes the result to load_refined_prompts. One of vlm / vlm_url and one of llm / llm_url, as on
    the command line; vlm_model / llm_model name the models an endpoint serves; backend_options
    (api_key_env, timeout, device, batch_size) go to both. The VLM is released before the LLM is
    loaded, so the two 7B-class models never share the GPU. clip_tokenizer: the generator's
    tokenizer, so that every prompt written fits its 77 tokens.
    """
    describer = make_describer(vlm, vlm_url, vlm_model, **backend_options)
    describe(run_dir, describer, per_class, class_names)
    del describer
    _release_gpu_memory()
    writer = make_writer(llm, llm_url, llm_model, **backend_options)
    path = summarise(run_dir, writer, prompts_per_class, clip_tokenizer)
    del writer
    _release_gpu_memory()
    report(run_dir)
    return path


# ---------------------------------------------------------------------------------------------
# Backends. A describer maps (images: list[PIL.Image], questions: list[str]) -> list[str]; a writer
# maps (requests: list[str], prefixes: list[str]) -> list[str] replies. Both have a batch_size: how
# many items one call takes (and so how much a crash can lose).

def _torch_setup(device):
    import torch
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Half precision halves the memory of a 7B model on a GPU; CPUs are slow or unsupported in it.
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def _release_gpu_memory():
    """Hand the cached blocks of a dropped model back to the GPU, for the next model or the training."""
    torch = sys.modules.get("torch")  # imported by the model backends and run_folder, not here
    if torch is not None and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def _load(what, loader, path, **kwargs):
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError) as e:
        raise IntrospectError(f"cannot load {what} {path!r}: {run_folder.clip(e, 200)}") from None


class LlavaDescriber:
    """LLaVA-NeXT (LLaVA-1.6) through transformers, from a local folder or a hub id; greedy decoding."""

    def __init__(self, path=DEFAULT_VLM, device=None, batch_size=4, max_new_tokens=200):
        from transformers import AutoProcessor, LlavaNextForConditionalGeneration
        self.device, dtype = _torch_setup(device)
        self.processor = _load("VLM processor", AutoProcessor.from_pretrained, path)
        if getattr(self.processor, "chat_template", None) is None:
            raise IntrospectError(f"VLM processor {path!r} has no chat template")
        # Generation appends after the last position, so shorter prompts must be padded on the left.
        self.processor.tokenizer.padding_side = "left"
        self.model = _load("VLM", LlavaNextForConditionalGeneration.from_pretrained, path, dtype=dtype)
        self.model.to(self.device).eval()
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def __call__(self, images, questions):
        import torch
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True, tokenize=False) for q in questions]
        # input_ids [B, L]; pixel_values [B, 1 + patches, 3, H, W]; image_sizes [B, 2]
        inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device, self.model.dtype)  # casts the floating tensors (pixel_values) only
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.processor.tokenizer.pad_token_id)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class CausalLMWriter:
    """A chat causal LM through transformers (AutoModelForCausalLM + AutoTokenizer); greedy decoding.

    The reply is started with the required prefix (the assistant turn is pre-filled and continued),
    so that small local models cannot wander off into a preamble.
    """

    def __init__(self, path, device=None, batch_size=4, max_new_tokens=80):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.device, dtype = _torch_setup(device)
        self.tokenizer = _load("LLM tokenizer", AutoTokenizer.from_pretrained, path)
        if self.tokenizer.chat_template is None:
            raise IntrospectError(f"LLM tokenizer {path!r} has no chat template; use a chat/instruct model")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = _load("LLM", AutoModelForCausalLM.from_pretrained, path, dtype=dtype)
        self.model.to(self.device).eval()
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def __call__(self, requests, prefixes):
        import torch
        texts = [self.tokenizer.apply_chat_template(
            [{"role": "user", "content": r}, {"role": "assistant", "content": p}],
            continue_final_message=True, tokenize=False) for r, p in zip(requests, prefixes)]
        # The template already holds BOS and the like: add_special_tokens=False keeps them single.
        inputs = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        continuations = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [p + ("" if c[:1].isspace() else " ") + c for p, c in zip(prefixes, continuations)]


def chat_completion(url, model, content, api_key=None, timeout=120.0, max_tokens=300):
    """POST one user message to an OpenAI-compatible /chat/completions URL; return the reply text.

    content: a str, or a list of parts ({"type": "text", ...}, {"type": "image_url", ...}).
    Every failure (no connection, timeout, HTTP error, malformed reply) is a one-line IntrospectError.
    """
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "temperature": 0}).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        hint = " (check the API key variable, --api-key-env)" if e.code in (401, 403) else ""
        detail = run_folder.clip(e.read(500).decode("utf-8", "replace"))
        raise IntrospectError(f"{url}: HTTP {e.code} {e.reason}{hint}: {detail}") from None
    except (OSError, http.client.HTTPException) as e:  # URLError and TimeoutError are OSErrors
        reason = getattr(e, "reason", e)  # URLError wraps the socket's error, e.g. a connect timeout
        if isinstance(reason, TimeoutError):
            raise IntrospectError(f"{url}: no reply within {timeout:g} s (raise --timeout)") from None
        raise IntrospectError(f"{url}: request failed: {run_folder.clip(reason) or type(reason).__name__}") from None
    shown = run_folder.clip(raw.decode("utf-8", "replace"))
    try:
        reply = json.loads(raw)
    except ValueError:
        raise IntrospectError(f"{url}: reply is not JSON: {shown}") from None
    try:
        text = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        text = None
    if not isinstance(text, str):
        raise IntrospectError(f"{url}: reply has no choices[0].message.content: {shown}")
    return text


def endpoint_url(url):
    """The chat-completions URL from a base URL ("http://host:8000/v1") or the full one."""
    if not re.match(r"https?://[^/]", url):
        raise IntrospectError(f"endpoint URL {url!r} must start with http:// or https://")
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class EndpointDescriber:
    """A VLM behind an OpenAI-compatible endpoint; one image per request, sent as a base64 PNG data URL."""

    batch_size = 1

    def __init__(self, url, model=DEFAULT_VLM, api_key_env="LTG_API_KEY", timeout=120.0, max_tokens=300):
        self.url, self.model, self.timeout, self.max_tokens = endpoint_url(url), model, timeout, max_tokens
        self.api_key = os.environ.get(api_key_env)

    def __call__(self, images, questions):
        replies = []
        for image, question in zip(images, questions):
            png = io.BytesIO()
            image.save(png, format="PNG")
            data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode("ascii")
            content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_url}}]
            replies.append(chat_completion(self.url, self.model, content, self.api_key, self.timeout,
                                           self.max_tokens))
        return replies


class EndpointWriter:
    """An LLM behind an OpenAI-compatible endpoint. The prefix is asked for in the request itself
    (not every API lets a reply be pre-filled); refine_prompt repairs what comes back."""

    batch_size = 1

    def __init__(self, url, model=DEFAULT_ENDPOINT_LLM, api_key_env="LTG_API_KEY", timeout=120.0, max_tokens=120):
        self.url, self.model, self.timeout, self.max_tokens = endpoint_url(url), model, timeout, max_tokens
        self.api_key = os.environ.get(api_key_env)

    def __call__(self, requests, prefixes):
        return [chat_completion(self.url, self.model, r, self.api_key, self.timeout, self.max_tokens)
                for r in requests]


def check_backend(kind, path_or_id, url):
    """A model step ("vlm" or "llm") needs exactly one backend: a transformers model or an endpoint."""
    if (path_or_id is None) == (url is None):
        raise IntrospectError(f"give exactly one of --{kind} PATH_OR_ID or --{kind}-url URL")


def make_describer(vlm=None, vlm_url=None, model=None, api_key_env="LTG_API_KEY", timeout=120.0, device=None,
                   batch_size=4):
    """LlavaDescriber(vlm) or EndpointDescriber(vlm_url); exactly one of the two must be given."""
    check_backend("vlm", vlm, vlm_url)
    if vlm_url is not None:
        return EndpointDescriber(vlm_url, model or DEFAULT_VLM, api_key_env, timeout)
    return LlavaDescriber(vlm, device, batch_size)


def make_writer(llm=None, llm_url=None, model=None, api_key_env="LTG_API_KEY", timeout=120.0, device=None,
                batch_size=4):
    """CausalLMWriter(llm) or EndpointWriter(llm_url); exactly one of the two must be given."""
    check_backend("llm", llm, llm_url)
    if llm_url is not None:
        return EndpointWriter(llm_url, model or DEFAULT_ENDPOINT_LLM, api_key_env, timeout)
    return CausalLMWriter(llm, device, batch_size)


# ---------------------------------------------------------------------------------------------
# Command line.

def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


RUN_DIR_HELP = ("a train_loop.py run folder, or any folder holding metadata.jsonl (Hugging Face imagefolder "
                "format: file_name, label, class_name, signal ...) and the images it lists")


def build_parser():
    parser = argparse.ArgumentParser(prog="introspect.py", description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)

    def backend_options(p, kind, default_model):
        p.add_argument("run_dir", help=RUN_DIR_HELP)
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument(f"--{kind}", metavar="PATH_OR_ID", help="a transformers model: local folder or hub id")
        source.add_argument(f"--{kind}-url", metavar="URL",
                            help="an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
        p.add_argument("--model", help=f"model name sent to the endpoint (default {default_model})")
        p.add_argument("--api-key-env", default="LTG_API_KEY", metavar="VAR",
                       help="environment variable holding the endpoint's API key (default LTG_API_KEY)")
        p.add_argument("--timeout", type=_positive_float, default=120.0,
                       help="seconds per endpoint request (default 120)")
        p.add_argument("--device", help="torch device for a transformers model (default: cuda if available)")
        p.add_argument("--batch-size", type=_positive_int, default=4,
                       help="images or requests per transformers batch (default 4)")

    d = steps.add_parser("describe", help="the hardest images of each class -> introspection/descriptions.jsonl")
    backend_options(d, "vlm", DEFAULT_VLM)
    d.add_argument("--per-class", type=_positive_int, default=PROMPTS_PER_CLASS,
                   help=f"images to describe per class, highest signal first (default {PROMPTS_PER_CLASS})")
    d.add_argument("--class-names", metavar="FILE",
                   help="JSON list or one name per line, indexed by label, for metadata.jsonl without class_name")

    s = steps.add_parser("summarise", help="the descriptions -> introspection/refined_prompts.json")
    backend_options(s, "llm", DEFAULT_ENDPOINT_LLM)
    s.add_argument("--prompts-per-class", type=_positive_int, default=PROMPTS_PER_CLASS,
                   help=f"refined prompts kept per class (default {PROMPTS_PER_CLASS}, P in the paper)")
    s.add_argument("--clip-tokenizer", metavar="PATH_OR_ID",
                   help="the generator's CLIP tokenizer (e.g. SD_FOLDER/tokenizer): reject prompts over 77 tokens "
                        "(default: over 300 characters)")

    r = steps.add_parser("report", help="introspection/report.md and contact_sheet.png")
    r.add_argument("run_dir", help=RUN_DIR_HELP)
    r.add_argument("--images-per-class", type=_positive_int, default=5, help="thumbnails per class on the sheet")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if not Path(args.run_dir).is_dir():
            raise IntrospectError(f"run folder {args.run_dir!r} does not exist")
        images, folder = run_folder.introspection_paths(args.run_dir)
        if args.step == "describe":
            names = read_class_names(args.class_names) if args.class_names else None
            read_image_rows(images, names)  # bad input fails before a 7B model is loaded
            describer = make_describer(args.vlm, args.vlm_url, args.model, args.api_key_env, args.timeout,
                                       args.device, args.batch_size)
            describe(args.run_dir, describer, args.per_class, names)
        elif args.step == "summarise":
            read_descriptions(folder)
            tokenizer = None
            if args.clip_tokenizer:
                from transformers import AutoTokenizer
                tokenizer = _load("CLIP tokenizer", AutoTokenizer.from_pretrained, args.clip_tokenizer)
            writer = make_writer(args.llm, args.llm_url, args.model, args.api_key_env, args.timeout,
                                 args.device, args.batch_size)
            summarise(args.run_dir, writer, args.prompts_per_class, tokenizer)
        else:
            for path in report(args.run_dir, args.images_per_class):
                print(path)
    except (IntrospectError, run_folder.RunFolderError) as e:
        print(f"introspect.py {args.step}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
