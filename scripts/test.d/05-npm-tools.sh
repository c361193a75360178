# Sourced by scripts/test.sh: installs the npm MCP tools the tests run against the HTTP server
# into the project-local .npm-tools/ (git-ignored): the Inspector CLI (tests/test_mcp_http.py)
# and the conformance suite (tests/test_http_edge.py). Idempotent: nothing is fetched when the
# pinned version is already there. Without node/npm it says so and goes on; the tests then skip
# (or fail under CI=true).
_npm_tools="$PWD/.npm-tools"

# _npm_tool PACKAGE VERSION BIN VARIABLE: install PACKAGE@VERSION unless it is there, then export
# VARIABLE=<path of its BIN>.
_npm_tool() {
  local pkg=$1 version=$2 bin="$_npm_tools/node_modules/.bin/$3" var=$4
  local manifest="$_npm_tools/node_modules/$1/package.json"
  if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    echo "05-npm-tools: node/npm not found; tests needing $pkg will skip (fail under CI=true)" >&2
    return 0
  fi
  if [ -x "$bin" ] && grep -q "\"version\": \"$version\"" "$manifest" 2>/dev/null; then
    echo "05-npm-tools: $pkg $version already in .npm-tools"
  else
    echo "05-npm-tools: installing $pkg@$version into .npm-tools"
    mkdir -p "$_npm_tools"
    [ -f "$_npm_tools/package.json" ] || echo '{"name": "sciorch-npm-tools", "private": true}' >"$_npm_tools/package.json"
    if ! npm install --prefix "$_npm_tools" --no-audit --no-fund --loglevel=error \
        "$pkg@$version" >&2; then
      echo "05-npm-tools: npm install of $pkg failed; its tests will skip (fail under CI=true)" >&2
    fi
  fi
  if [ -x "$bin" ]; then
    export "$var=$bin"
  fi
}

_npm_tool @modelcontextprotocol/inspector-cli 1.0.3 mcp-inspector-cli SCIORCH_INSPECTOR_CLI
# 0.1.11: the newest that runs on Node 20.
_npm_tool @modelcontextprotocol/conformance 0.1.11 conformance SCIORCH_CONFORMANCE_CLI
unset -f _npm_tool
unset _npm_tools
