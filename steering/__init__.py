"""Steering: closed-loop campaigns. gpCAM chooses each next measurement (`optimizer`), the
runner carries it out through sciorch's own MCP tools (`runner`, `client`), everything is stored
so a campaign survives its process (`store`), the server runs campaigns for its callers
(`manager`), and `plots` draws the outcome. A campaign is declared by `spec.CampaignSpec`."""
