"""The page at ``GET /`` in a real browser (Chromium, driven by Selenium): upload an image, draw one; with a key."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_split

requests = pytest.importorskip("requests", reason="the serve tests need requests (pip install -e '.[test]')")
serve = pytest.importorskip("fashion_lightning.serve", reason="needs the serve extra: pip install -e '.[serve]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install -e '.[test]'")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no Chromium here: apt-get install -y chromium chromium-driver")


@pytest.fixture(scope="module")
def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1000,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def shown(driver: webdriver.Chrome, answers: int) -> tuple[str, list[str]]:
    """Wait until the page shows its ``answers``-th answer; the top class and the bars' classes."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "bars").get_attribute("data-answers")
                                    == str(answers) or d.find_element(By.ID, "error").text)
    assert driver.find_element(By.ID, "error").text == ""
    bars = [bar.get_attribute("data-class") for bar in driver.find_elements(By.CSS_SELECTOR, "#bars .bar")]
    return driver.find_element(By.ID, "top-class").text, bars


def seen_pixels(driver: webdriver.Chrome) -> np.ndarray:
    """The 28x28 'what the model saw' canvas, as gray levels."""
    data = driver.execute_script("const seen = document.getElementById('seen').getContext('2d');"
                                 "return Array.from(seen.getImageData(0, 0, 28, 28).data)")
    return np.array(data, dtype=np.uint8).reshape(28, 28, 4)[..., 0]


def test_upload_and_draw_in_a_browser(browser: webdriver.Chrome, server_url: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = synthetic_split(5, seed=3)[0][2]
    Image.fromarray(image).save(tmp_path / "item.png")
    api = requests.post(f"{server_url}/predict", files={"file": (tmp_path / "item.png").read_bytes()},
                        data={"return_input": "1"}, timeout=60).json()["predictions"][0]

    browser.get(server_url)
    WebDriverWait(browser, 60).until(lambda d: "804,554 parameters" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "item.png"))
    top, bars = shown(browser, 1)
    assert top == api["prediction"] and bars == [t["class"] for t in api["top"]]
    assert np.array_equal(seen_pixels(browser), np.array(api["input"], dtype=np.uint8))

    canvas = browser.find_element(By.ID, "canvas")  # a T-shirt-ish stroke: the answer is whatever the API says
    ActionChains(browser).move_to_element_with_offset(canvas, -60, -50).click_and_hold().move_by_offset(120, 0) \
        .move_by_offset(-60, 0).move_by_offset(0, 110).release().perform()
    drawing = base64.b64decode(browser.execute_script(
        "return document.getElementById('canvas').toDataURL('image/png').split(',')[1]"))
    browser.find_element(By.ID, "classify").click()
    top, bars = shown(browser, 2)
    expected = requests.post(f"{server_url}/predict", files={"file": ("drawing.png", drawing)},
                             timeout=60).json()["predictions"][0]
    assert top == expected["prediction"] and bars == [t["class"] for t in expected["top"]]
    assert seen_pixels(browser).max() == 255  # the stroke, cropped and scaled to fill the frame
    assert np.array(Image.open(io.BytesIO(drawing)).convert("L")).max() == 255


KEY = "page-k3y"


@pytest.fixture(scope="module")
def guarded_url(trained_run: Path) -> Iterator[str]:
    """A server with an API key (from the environment, as an operator sets it)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FASHION_LIGHTNING_API_KEY", KEY)
        with serve.in_background(trained_run / "checkpoints" / "best.ckpt") as url:
            yield url


def test_the_page_asks_for_the_api_key(browser: webdriver.Chrome, guarded_url: str, tmp_path: Path) -> None:
    """No key: a clear 401 message; a wrong one: another; the right one: model information and answers, and the
    key kept for the tab (sessionStorage) across a reload, nowhere else."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    Image.fromarray(synthetic_split(5, seed=3)[0][1]).save(tmp_path / "item.png")
    api = requests.post(f"{guarded_url}/predict", files={"file": (tmp_path / "item.png").read_bytes()},
                        headers={"X-API-Key": KEY}, timeout=60).json()["predictions"][0]
    text = lambda d, id_: d.find_element(By.ID, id_).text  # noqa: E731

    browser.get(guarded_url)
    WebDriverWait(browser, 60).until(lambda d: "needs its API key" in text(d, "key-status"))
    assert browser.find_element(By.ID, "key").get_attribute("type") == "password"
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "item.png"))
    WebDriverWait(browser, 60).until(lambda d: text(d, "error"))
    assert text(browser, "error") == "401: this server needs its API key: enter it in the API key field above"

    key = browser.find_element(By.ID, "key")
    key.send_keys("wrong\n")  # Enter: the form's submit
    WebDriverWait(browser, 60).until(lambda d: "wrong API key" in text(d, "key-status"))
    key.clear()
    key.send_keys(KEY + "\n")
    WebDriverWait(browser, 60).until(lambda d: "804,554 parameters" in text(d, "model"))
    assert text(browser, "key-status") == ""
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "item.png"))
    top, bars = shown(browser, 1)
    assert top == api["prediction"] and bars == [t["class"] for t in api["top"]]

    browser.refresh()  # the same tab: the key is still there
    WebDriverWait(browser, 60).until(lambda d: "804,554 parameters" in text(d, "model"))
    assert browser.find_element(By.ID, "key").get_attribute("value") == KEY
    stored = browser.execute_script("return [sessionStorage.length, localStorage.length, document.cookie]")
    assert stored == [1, 0, ""]
