# Sourced by scripts/test.sh: Debian's chromium and chromium-driver for the browser tests of the
# web hub (tests/test_hub_browser.py drives the real headless browser with Selenium; no browser
# download). apt-get runs only when one of them is missing, and only as root; otherwise it says
# so and goes on: the browser tests then skip (and fail under CI=true). Exports
# SCIORCH_CHROMIUM and SCIORCH_CHROMEDRIVER, the paths the tests use.
_chromium_missing() {
  ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1
}
if _chromium_missing; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "25-chromium: installing chromium and chromium-driver"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends chromium chromium-driver; } >&2 ||
      echo "25-chromium: apt-get install failed; the browser tests will skip (fail under CI=true)" >&2
  else
    echo "25-chromium: chromium/chromedriver missing and no root apt-get; the browser tests will skip (fail under CI=true)" >&2
  fi
fi
if ! _chromium_missing; then
  export SCIORCH_CHROMIUM="$(command -v chromium)" SCIORCH_CHROMEDRIVER="$(command -v chromedriver)"
  echo "25-chromium: $("$SCIORCH_CHROMIUM" --version 2>/dev/null | head -1)"
fi
unset -f _chromium_missing
