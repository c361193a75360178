"""The HTTP face: the app (`app`: proxy, health, the MCP mount), the per-entry proxy (`proxy`)
and the HTTP edge (`edge`: request-head deadlines). The web hub will join them here."""
