"""Drives detectd's page in headless Chromium (Debian's, through playwright; no browser
download) at 1280x800: opens /, uploads an image, runs detect with threshold 0 and the API key,
and reports what the page shows as JSON: the table, the canvas, the drawn image's width against
the page's, and what hovering, sorting and collapsing do. The screenshot is the 1280x800
viewport after the answer. Usage: page.py URL IMAGE SCREENSHOT API_KEY"""
import json
import shutil
import sys

from playwright.sync_api import sync_playwright

# Compares the canvas with the bare image: how many pixels the boxes changed, and whether the
# pixel just inside the first box's left edge was drawn over.
CANVAS_CHECK = """
async ([x, y]) => {
  const canvas = document.getElementById("canvas");
  const file = document.getElementById("file").files[0];
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  const bare = new OffscreenCanvas(bitmap.width, bitmap.height).getContext("2d");
  bare.drawImage(bitmap, 0, 0);
  const w = canvas.width, h = canvas.height;
  const a = canvas.getContext("2d").getImageData(0, 0, w, h).data;
  const b = bare.getImageData(0, 0, w, h).data;
  let changed = 0;
  for (let i = 0; i < a.length; i += 4) {
    if (a[i] !== b[i] || a[i + 1] !== b[i + 1] || a[i + 2] !== b[i + 2]) changed++;
  }
  const at = (y * w + x) * 4;
  const edge = a[at] !== b[at] || a[at + 1] !== b[at + 1] || a[at + 2] !== b[at + 2];
  return { width: w, height: h, changed, edge };
}
"""

# How wide the drawn image is on the page.
LAYOUT = """
() => ({
  drawn: document.getElementById("canvas").getBoundingClientRect().width,
  page: document.documentElement.clientWidth,
})
"""

# Which detection the canvas highlights, which rows are marked, and a checksum of the pixels.
HOT = """
() => {
  const canvas = document.getElementById("canvas");
  const a = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let sum = 0;
  for (let i = 0; i < a.length; i += 4) sum = (sum * 31 + a[i] + a[i + 1] + a[i + 2]) % 1000000007;
  const rows = [...document.querySelectorAll("#results tbody tr.hot")].map((r) => Number(r.dataset.index));
  return { canvas: Number(canvas.dataset.hot), rows, pixels: sum };
}
"""


def hover(page, box):
    """Hovers the first row, then the first box's centre on the canvas, then leaves."""
    before = page.evaluate(HOT)
    first = page.locator("#results tbody tr").nth(0)
    first.hover()
    row = {"index": int(first.get_attribute("data-index")), **page.evaluate(HOT)}
    page.mouse.move(0, 0)
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    # The image's point (x, y) scrolled to the viewport's middle, in viewport coordinates.
    client = page.evaluate("""([x, y]) => {
      const c = document.getElementById("canvas");
      let r = c.getBoundingClientRect();
      window.scrollBy(0, r.top + y * r.height / c.height - window.innerHeight / 2);
      r = c.getBoundingClientRect();
      return [r.left + x * r.width / c.width, r.top + y * r.height / c.height];
    }""", [x, y])
    page.mouse.move(client[0], client[1])
    canvas = page.evaluate(HOT)
    hot_box = None
    if canvas["rows"]:
        cells = page.locator(f"#results tbody tr[data-index='{canvas['rows'][0]}'] td").nth(4)
        hot_box = [float(v) for v in cells.text_content().split(",")]
    page.mouse.move(0, 0)
    after = page.evaluate(HOT)
    return {"before": before, "row": row, "canvas": {**canvas, "point": [x, y], "box": hot_box}, "after": after}


def column(page, n):
    return [c.text_content() for c in page.locator(f"#results tbody tr td:nth-child({n})").all()]


def sort(page):
    """Clicks the score header twice and the label header once; the columns after each."""
    page.click("th[data-key=score]")
    up = [float(v) for v in column(page, 4)]
    page.click("th[data-key=score]")
    down = [float(v) for v in column(page, 4)]
    page.click("th[data-key=label]")
    labels = [v.strip() for v in column(page, 2)]
    return {"score_up": up, "score_down": down, "label_up": labels,
            "aria": page.get_attribute("th[data-key=label]", "aria-sort")}


def collapse(page):
    """Clicks the table's summary twice: whether the table shows after each."""
    page.click("#table summary")
    closed = page.is_visible("#results")
    page.click("#table summary")
    return {"closed_visible": closed, "open_visible": page.is_visible("#results")}


def main():
    url, image, screenshot, key = sys.argv[1:5]
    with sync_playwright() as p:
        chromium = shutil.which("chromium") or "/usr/bin/chromium"
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        page.set_input_files("#file", image)
        page.select_option("#mode", "detect")
        page.fill("#threshold", "0")
        page.fill("#key", key)
        page.click("#run")
        page.wait_for_function(
            "document.getElementById('count').textContent || document.getElementById('error').textContent",
            timeout=240_000,
        )
        rows = page.locator("#results tbody tr")
        report = {
            "error": page.text_content("#error"),
            "count": page.text_content("#count"),
            "timing": page.text_content("#timing"),
            "rows": rows.count(),
        }
        if report["rows"]:
            box = [float(v) for v in rows.nth(0).locator("td").nth(4).text_content().split(",")]
            report["box"] = box
            report["canvas"] = page.evaluate(CANVAS_CHECK, [round(box[0]) + 1, round((box[1] + box[3]) / 2)])
            report["canvas"]["masks"] = int(page.get_attribute("#canvas", "data-masks") or 0)
            report["canvas"]["keypoints"] = int(page.get_attribute("#canvas", "data-keypoints") or 0)
            report["layout"] = page.evaluate(LAYOUT)
            page.screenshot(path=screenshot)
            report["hover"] = hover(page, box)
            report["sort"] = sort(page)
            report["collapse"] = collapse(page)
        else:
            page.screenshot(path=screenshot)
        browser.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
