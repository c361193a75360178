// Preloaded into an npm MCP tool (node --require) that has no option for request headers, such
// as the conformance CLI: every HTTP request it makes, through global fetch or undici's own
// request(), carries `Authorization: Bearer $SCIORCH_BEARER_TOKEN`. Both share undici's global
// dispatcher, so one Agent that adds the header covers both.
"use strict";
const path = require("path");
const token = process.env.SCIORCH_BEARER_TOKEN;
if (token) {
  const { Agent, setGlobalDispatcher } = require(
    require.resolve("undici", { paths: [process.cwd(), path.dirname(process.argv[1] || ".")] }),
  );
  const header = `Bearer ${token}`;
  const withAuth = (headers) => {
    if (headers == null) return { authorization: header };
    if (Array.isArray(headers)) {
      const flat = headers.flat();
      for (let i = 0; i < flat.length; i += 2) {
        if (String(flat[i]).toLowerCase() === "authorization") return headers;
      }
      return [...flat, "authorization", header];
    }
    const lower = Object.keys(headers).map((k) => k.toLowerCase());
    return lower.includes("authorization") ? headers : { ...headers, authorization: header };
  };
  class BearerAgent extends Agent {
    dispatch(opts, handler) {
      return super.dispatch({ ...opts, headers: withAuth(opts.headers) }, handler);
    }
  }
  setGlobalDispatcher(new BearerAgent());
}
