"""The prompt lab's pictures of a run: contact sheets, and ``index.html``, one self-contained page with
every image and its parameters, filterable by prompt (no network, no external scripts; relative links).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
header p { margin: 0.2rem 0; color: #555; }
.controls { margin: 1rem 0; display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; }
section { margin-bottom: 2rem; }
section h2 { font-size: 1.1rem; margin: 0.5rem 0; }
.images { display: flex; flex-wrap: wrap; gap: 0.75rem; }
figure { margin: 0; width: 220px; }
figure img { width: 100%; height: auto; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: 0.8rem; line-height: 1.3; }
figure.edit-input figcaption { font-weight: bold; }
.sheet img { max-width: 100%; image-rendering: pixelated; }
.hidden { display: none; }
"""

# Filtering: a drop-down of prompts plus a free-text match; hidden sections keep their images.
SCRIPT = """
const select = document.getElementById("prompt-filter");
const text = document.getElementById("text-filter");
const count = document.getElementById("shown-count");
function applyFilter() {
  const chosen = select.value;
  const needle = text.value.trim().toLowerCase();
  let shown = 0;
  for (const section of document.querySelectorAll("section[data-prompt-index]")) {
    const prompt = section.dataset.prompt.toLowerCase();
    const visible = (chosen === "all" || chosen === section.dataset.promptIndex) &&
      (needle === "" || prompt.includes(needle));
    section.classList.toggle("hidden", !visible);
    if (visible) shown += section.querySelectorAll("figure[data-seed]").length;
  }
  count.textContent = shown + " of " + document.querySelectorAll("figure[data-seed]").length + " images";
}
select.addEventListener("change", applyFilter);
text.addEventListener("input", applyFilter);
applyFilter();
"""


def contact_sheet(images: Sequence, seeds: Sequence[int], guidance_scales: Sequence[float],
                  inputs=None) -> Image.Image:
    """One prompt's images on a grid: a row per seed, a column per guidance scale, labelled; an
    edit's input image (and mask) lead every row, so each row reads input | mask | outputs."""
    width, height = images[0].image.size
    label_width, label_height, pad = 64, 16, 2
    leading = [] if inputs is None else [("input", inputs.image)] + (
        [("mask", inputs.mask)] if inputs.mask is not None else [])
    headers = [label for label, _ in leading] + [f"guidance {g:g}" for g in guidance_scales]
    sheet = Image.new(
        "RGB", (label_width + len(headers) * (width + pad), label_height + len(seeds) * (height + pad)), "white"
    )
    draw = ImageDraw.Draw(sheet)
    by_cell = {(im.seed, im.guidance_scale): im.image for im in images}
    for column, header in enumerate(headers):
        draw.text((label_width + column * (width + pad) + 2, 2), header, fill="black")
    for row, seed in enumerate(seeds):
        top = label_height + row * (height + pad)
        draw.text((2, top + height // 2 - 5), f"seed {seed}", fill="black")
        cells = [picture for _, picture in leading] + [by_cell[(seed, float(g))] for g in guidance_scales]
        for column, cell in enumerate(cells):
            sheet.paste(cell.convert("RGB"), (label_width + column * (width + pad), top))
    return sheet


def write_gallery(path: str | Path, settings: dict[str, Any], rows: list[dict[str, Any]], grids: dict[str, str],
                  inputs: dict[str, str] | None = None) -> Path:
    """Write the page to ``path``; ``rows`` are ``results.json``'s images (paths relative to it);
    ``inputs``: an edit's ``{"input": path, "mask": path}``, shown before each prompt's outputs."""
    esc = html.escape
    prompts = settings["prompts"]
    options = ['<option value="all">all prompts</option>'] + [
        f'<option value="{i}">{esc(_shorten(prompt))}</option>' for i, prompt in enumerate(prompts)
    ]
    inputs = inputs or {}
    edit_figures = [
        f'<figure class="edit-input" data-input="{name}"><a href="{esc(source)}"><img src="{esc(source)}" '
        f'alt="{name}" width="{settings["width"]}" height="{settings["height"]}" loading="eager"></a>'
        f"<figcaption>{_INPUT_CAPTIONS[name]}</figcaption></figure>"
        for name, source in inputs.items()
    ]
    sections = []
    for index, prompt in enumerate(prompts):
        figures = edit_figures + [_figure(row) for row in rows if row["prompt_index"] == index]
        sheet = grids.get(prompt)
        sheet_html = (
            f'<details class="sheet"><summary>contact sheet (rows = seeds, columns = guidance)</summary>'
            f'<a href="{esc(sheet)}"><img src="{esc(sheet)}" alt="contact sheet for prompt {index}"></a></details>'
            if sheet else ""
        )
        sections.append(
            f'<section data-prompt-index="{index}" data-prompt="{esc(prompt)}">\n'
            f"<h2>{esc(prompt)}</h2>\n{sheet_html}\n<div class=\"images\">\n" + "\n".join(figures) + "\n</div>\n</section>"
        )
    summary = (
        f"model <code>{esc(settings['model'])}</code>"
        + (f", refiner <code>{esc(settings['refiner'])}</code>" if settings.get("refiner") else "")
        + f" · scheduler {esc(settings['scheduler'])} ({esc(settings['scheduler_class'])})"
        + f" · {settings['num_inference_steps']} steps · {settings['width']}×{settings['height']}"
        + f" · {esc(settings['device'])}, {esc(settings['dtype'])}"
        + (f" · {esc(settings['task'])} of <code>{esc(settings['init_image'])}</code>"
           + (f" with mask <code>{esc(settings['mask_image'])}</code>" if settings.get("mask_image") else "")
           + f", strength {settings['strength']:g}" if settings.get("init_image") else "")
    )
    notes = "".join(f"<p>note: {esc(note)}</p>" for note in settings.get("notes", []))
    negative = settings.get("negative_prompt")
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>SDXL prompt lab</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>SDXL prompt lab</h1>
<p>{summary}</p>
{f"<p>negative prompt: {esc(negative)}</p>" if negative else ""}
{notes}
<p>{len(rows)} images: {len(prompts)} prompts × {len(settings['guidance_scales'])} guidance scales ×
{len(settings['seeds'])} seeds · <a href="results.json">results.json</a></p>
</header>
<div class="controls">
<label>prompt <select id="prompt-filter">{"".join(options)}</select></label>
<label>contains <input id="text-filter" type="search" placeholder="filter prompts"></label>
<span id="shown-count"></span>
</div>
{chr(10).join(sections)}
<script>{SCRIPT}</script>
</body>
</html>
"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def _figure(row: dict[str, Any]) -> str:
    esc = html.escape
    caption = (
        f"seed {row['seed']} · guidance {row['guidance_scale']:g} · {row['num_inference_steps']} steps"
        f" · {esc(row['scheduler'])} · {row['seconds']:.2f} s"
    )
    alt = f"{row['prompt']} (seed {row['seed']}, guidance {row['guidance_scale']:g})"
    return (
        f'<figure data-seed="{row["seed"]}" data-guidance="{row["guidance_scale"]:g}">'
        f'<a href="{esc(row["path"])}"><img src="{esc(row["path"])}" alt="{esc(alt)}" '
        f'width="{row["width"]}" height="{row["height"]}" loading="eager"></a>'
        f"<figcaption>{esc(row['prompt'])}<br>{caption}</figcaption></figure>"
    )


_INPUT_CAPTIONS = {"input": "input image", "mask": "mask (white = regenerated)"}


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"

