"""The screenshot of docs/serve.md: `transformer-serve` with a checkpoint, its page in headless Chromium.

    python scripts/screenshot_serve.py --checkpoint runs/multi30k_de_en/checkpoints/final.pt --output docs/serve.png

It translates SENTENCE, shows the cross-attention of the last layer averaged over the heads with the
row of ROW chosen, and saves the whole page. Needs Debian's `chromium` and `chromium-driver`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

SENTENCE = "Ein Mann fährt mit dem Fahrrad durch den Park."
ROW = "▁man"
WIDTH = 1100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--output", type=Path, default=Path("docs/serve.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "serve.log"
        with open(log, "wb") as out:
            server = subprocess.Popen([sys.executable, "-m", "transformer.commands.serve", "--checkpoint",
                                       args.checkpoint, "--port", "0"], stdout=out, stderr=subprocess.STDOUT)
        try:
            while not (found := re.search(r"serving on (http://\S+/)", log.read_text(encoding="utf-8"))):
                if server.poll() is not None:
                    sys.exit(f"transformer-serve did not start:\n{log.read_text(encoding='utf-8')}")
                time.sleep(0.1)
            shoot(found.group(1), args.output)
        finally:
            server.terminate()
            server.wait(60)
    print(f"wrote {args.output}")


def shoot(url: str, output: Path) -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("google-chrome")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WIDTH},1000",
                     "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        wait = WebDriverWait(driver, 300)
        driver.get(url)
        wait.until(lambda d: "parameters" in d.find_element(By.ID, "model-info").text)
        driver.find_element(By.ID, "source").send_keys(SENTENCE)
        driver.find_element(By.ID, "translate-button").click()
        wait.until(lambda d: d.find_element(By.ID, "work-section").is_displayed())
        Select(driver.find_element(By.ID, "kind")).select_by_value("cross")
        Select(driver.find_element(By.ID, "head")).select_by_value("mean")
        for button in driver.find_elements(By.CSS_SELECTOR, "#heatmap tbody button"):
            if button.text == ROW:
                button.click()
                break
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(WIDTH, height)
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        driver.save_screenshot(str(output))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
