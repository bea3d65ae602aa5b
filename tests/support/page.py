"""Drives detectd's page in headless Chromium (Debian's, through playwright; no browser
download): opens /, uploads an image, runs detect with threshold 0 and the API key, and
reports what the page shows as JSON. Usage: page.py URL IMAGE SCREENSHOT API_KEY"""
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


def main():
    url, image, screenshot, key = sys.argv[1:5]
    with sync_playwright() as p:
        chromium = shutil.which("chromium") or "/usr/bin/chromium"
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
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
        page.screenshot(path=screenshot, full_page=True)
        browser.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
