# Sourced by scripts/test.sh: installs the npm MCP Inspector CLI that tests/test_mcp_http.py runs
# against the HTTP server, into the project-local .npm-tools/ (git-ignored). Idempotent: nothing
# is fetched when the pinned version is already there. Without node/npm it says so and goes on;
# the test then skips (or fails under CI=true).
SCIORCH_INSPECTOR_VERSION=1.0.3
_npm_tools="$PWD/.npm-tools"
_inspector_bin="$_npm_tools/node_modules/.bin/mcp-inspector-cli"
_inspector_pkg="$_npm_tools/node_modules/@modelcontextprotocol/inspector-cli/package.json"
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  echo "05-npm-inspector: node/npm not found; the inspector test will skip (fail under CI=true)" >&2
elif [ -x "$_inspector_bin" ] && grep -q "\"version\": \"$SCIORCH_INSPECTOR_VERSION\"" "$_inspector_pkg" 2>/dev/null; then
  echo "05-npm-inspector: inspector-cli $SCIORCH_INSPECTOR_VERSION already in .npm-tools"
else
  echo "05-npm-inspector: installing @modelcontextprotocol/inspector-cli@$SCIORCH_INSPECTOR_VERSION into .npm-tools"
  mkdir -p "$_npm_tools"
  [ -f "$_npm_tools/package.json" ] || echo '{"name": "sciorch-npm-tools", "private": true}' >"$_npm_tools/package.json"
  if ! npm install --prefix "$_npm_tools" --no-audit --no-fund --loglevel=error \
      "@modelcontextprotocol/inspector-cli@$SCIORCH_INSPECTOR_VERSION" >&2; then
    echo "05-npm-inspector: npm install failed; the inspector test will skip (fail under CI=true)" >&2
  fi
fi
if [ -x "$_inspector_bin" ]; then
  export SCIORCH_INSPECTOR_CLI="$_inspector_bin"
fi
unset _npm_tools _inspector_bin _inspector_pkg
