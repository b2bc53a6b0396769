"""tokens_workspaces: tokens, workspaces and permissions (needs --root-token).

Part 1 (an ordinary, anonymous workspace owner O): generate_token with the three permission
levels; a second client joins O's workspace with each: read_write can register and call but
not mint tokens, read-only connects but can neither register services nor echo, admin can
mint and revoke tokens and parse them. A revoked token is refused ("Token has been
revoked"), a specialized token (extra scope containing ':') is refused for websocket
access, a client_id-restricted token works only for that client id, expires_in sets the
lifetime, and the usual refusals carry the upstream texts.

Part 2 (root): create_workspace / get_workspace_info / list_workspaces / delete_workspace,
a token minted by root lets a client join the created workspace, and a non-persistent
workspace disappears when its last client leaves.

Note: tokens minted by root inherit root's `admin` role (so their `permission` level is
moot); that is why part 1 uses an ordinary owner."""

import base64
import json
import secrets

from _common import Scenario, plain, wait_until


def claims(token):
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


async def part1(sc):
    owner = await sc.connect("workspace owner", client_id="tok-owner")
    ws = owner.config.workspace
    t_rw = await owner.generate_token()
    t_r = await owner.generate_token({"permission": "read"})
    t_a = await owner.generate_token({"permission": "admin", "expires_in": 600})
    sc.check("generate_token returns JWT strings",
             all(isinstance(t, str) and t.count(".") == 2 for t in (t_rw, t_r, t_a)), "")
    sc.check("default permission is read_write (scope ws:{ws}#rw and wid:{ws})",
             f"ws:{ws}#rw" in claims(t_rw)["scope"].split() and f"wid:{ws}" in claims(t_rw)["scope"].split(),
             claims(t_rw))
    sc.check("permission read -> #r", f"ws:{ws}#r" in claims(t_r)["scope"].split(), claims(t_r)["scope"])
    sc.check("permission admin -> #a", f"ws:{ws}#a" in claims(t_a)["scope"].split(), claims(t_a)["scope"])
    c = claims(t_a)
    sc.eq("expires_in=600 sets exp - iat", c["exp"] - c["iat"], 600)
    c = claims(t_rw)
    sc.eq("default lifetime is 3600 s", c["exp"] - c["iat"], 3600)
    sc.eq("token parent is the issuing user", c.get("https://amun.ai/parent"), owner.config.user["id"])
    await sc.expect_error("generate_token with an invalid permission fails",
                          owner.generate_token({"permission": "bogus"}),
                          ["validation error", "Invalid permission"])

    # read_write
    rw = await sc.connect("read_write client", client_id="tok-rw", workspace=ws, token=t_rw)
    sc.eq("read_write client joined the owner's workspace", rw.config.workspace, ws)
    sc.eq("read_write client has rw", rw.config.user["scope"]["workspaces"].get(ws), "rw")
    sc.eq("read_write client user.parent is the owner", rw.config.user.get("parent"), owner.config.user["id"])
    reg = await sc.attempt("read_write client registers a service",
                           rw.register_service({"id": "rw-svc", "f": lambda: "rw-ok"}))
    sc.check("read_write client registered a (protected) service", reg is not None, "")
    sc.eq("read_write client echo", await rw.echo("hi"), "hi")
    # The owner's personal workspace: a read_write child of the owner counts as the owner
    # (server spec 6.4; upstream test_owner_can_generate_token_with_read_write_token).
    t_rwchild = await sc.attempt("read_write child of the owner can mint tokens for the owner's workspace",
                                 rw.generate_token())
    sc.check("token minted by the read_write child is for the workspace",
             t_rwchild is not None and f"wid:{ws}" in claims(t_rwchild)["scope"].split(), "")
    svc = await owner.get_service("tok-rw:rw-svc")
    sc.eq("owner calls the read_write client's protected service", await svc.f(), "rw-ok")

    # read-only
    ro = await sc.connect("read-only client", client_id="tok-ro", workspace=ws, token=t_r)
    sc.eq("read-only client joined the workspace", ro.config.workspace, ws)
    sc.eq("read-only client has r", ro.config.user["scope"]["workspaces"].get(ws), "r")
    await sc.expect_error("read-only client cannot register services",
                          ro.register_service({"id": "ro-svc", "f": lambda: 1}),
                          [f"Permission denied for workspace {ws}"])
    await sc.expect_error("read-only client cannot echo (needs rw)", ro.echo(1),
                          [f"Permission denied for workspace {ws}"])
    svc = await sc.attempt("read-only client gets a protected service of its workspace",
                           ro.get_service("tok-rw:rw-svc"))
    if svc is not None:
        sc.eq("read-only client calls it", await svc.f(), "rw-ok")
    ids = [s["id"] for s in await ro.list_services()]
    sc.check("read-only client lists services", f"{ws}/tok-rw:rw-svc" in ids, ids)
    sc.check("read-only client has no registered services (not even built-in)",
             not any("/tok-ro:" in i for i in ids), ids)

    # admin
    adm = await sc.connect("admin client", client_id="tok-admin", workspace=ws, token=t_a)
    sc.eq("admin client has a", adm.config.user["scope"]["workspaces"].get(ws), "a")
    t_child = await sc.attempt("admin client generates a token", adm.generate_token())
    sc.check("admin-minted token is for the same workspace",
             t_child is not None and f"wid:{ws}" in claims(t_child)["scope"].split(), t_child and claims(t_child))
    parsed = plain(await adm.parse_token(t_rw))
    sc.eq("parse_token: permission", (parsed.get("scope") or {}).get("workspaces", {}).get(ws), "rw")
    sc.eq("parse_token: current_workspace", parsed.get("current_workspace"), ws)
    sc.eq("parse_token: parent", parsed.get("parent"), owner.config.user["id"])
    await sc.expect_error("parse_token of garbage fails", adm.parse_token("garbage"), ["not enough values", "Invalid"])

    # revocation
    t_rev = await adm.generate_token()
    tmp = await sc.connect("client with the soon-revoked token", client_id="tok-rev1", workspace=ws, token=t_rev)
    await sc.disconnect(tmp)
    sc.eq("revoke_token returns None", await adm.revoke_token(t_rev), None)
    await sc.expect_error("connecting with a revoked token fails",
                          sc.try_connect(client_id="tok-rev2", workspace=ws, token=t_rev),
                          ["Token has been revoked"])
    await sc.expect_error("read_write client cannot revoke tokens", rw.revoke_token(t_child),
                          ["Permission denied"])

    # specialized token
    t_spec = await adm.generate_token({"extra_scopes": ["my-data:read"]})
    sc.check("a specialized token can be generated", "my-data:read" in claims(t_spec)["scope"].split(),
             claims(t_spec))
    await sc.expect_error("a specialized token is refused for websocket access",
                          sc.try_connect(client_id="tok-spec", workspace=ws, token=t_spec),
                          ["Specialized token"])

    # client_id restriction
    t_cid = await adm.generate_token({"client_id": "only-me"})
    sc.check("client_id restriction -> cid:only-me", "cid:only-me" in claims(t_cid)["scope"].split(),
             claims(t_cid)["scope"])
    await sc.expect_error("client_id-restricted token refused for another client id",
                          sc.try_connect(client_id="not-me", workspace=ws, token=t_cid),
                          ["Client id mismatch: this token is restricted to client with client_id='only-me'"])
    me = await sc.connect("client_id-restricted token with its client id", client_id="only-me",
                          workspace=ws, token=t_cid)
    sc.eq("restricted token: scope.client_id", me.config.user["scope"].get("client_id"), "only-me")

    # refusals
    other = await sc.connect("unrelated anonymous client", client_id="tok-other")
    await sc.expect_error("token for a workspace without permission is refused",
                          other.generate_token({"workspace": ws}),
                          [f"You do not have any permission for workspace: {ws}"])
    await sc.expect_error("joining another user's workspace without a token is refused",
                          sc.try_connect(client_id="tok-anon2", workspace=ws),
                          [f"Permission denied for workspace: {ws}"])
    await sc.expect_error("token workspace != requested workspace is refused",
                          sc.try_connect(client_id="tok-wrong", workspace=other.config.workspace, token=t_rw),
                          [f"Current workspace encoded in the token ({ws}) does not match the specified workspace"])
    await sc.expect_error("connecting to a nonexistent workspace fails",
                          sc.try_connect(client_id="tok-nows", workspace="nonexistent-interop-ws"),
                          ["does not exist or is not accessible"])
    await sc.expect_error("an outsider cannot list the workspace's clients",
                          other.list_clients(ws), [f"Permission denied for workspace {ws}"])
    await sc.expect_error("anonymous user cannot create workspaces",
                          other.create_workspace({"name": f"anon-{secrets.token_hex(3)}"}),
                          ["Only registered user can create workspace"])
    clients = [x["id"] for x in await owner.list_clients()]
    sc.check("list_clients shows the connected clients (not the read-only one)",
             {f"{ws}/tok-owner", f"{ws}/tok-rw", f"{ws}/tok-admin", f"{ws}/only-me"} <= set(clients)
             and f"{ws}/tok-ro" not in clients, clients)
    # Last, because upstream then drops the *active* client's records (see README).
    await sc.expect_error("a second client with the id of an active one is refused",
                          sc.try_connect(client_id="tok-rw", workspace=ws, token=t_rw),
                          [f"Client already exists and is active: {ws}/tok-rw"])


async def part2(sc):
    sc.need_root()
    root = await sc.connect("root", client_id="tok-root", token=sc.root_token)
    sc.eq("root token: user id", root.config.user["id"], "root")
    sc.check("root token: admin role", "admin" in (root.config.user.get("roles") or []), root.config.user)
    sc.eq("root token: workspace", root.config.workspace, "ws-user-root")

    ws = f"interop-tok-{secrets.token_hex(4)}"
    created = await sc.attempt("create_workspace", root.create_workspace(
        {"name": ws, "description": "interop scenario workspace"}))
    sc.require("create_workspace returns the workspace", created is not None and created["id"] == ws,
               plain(created))
    info = plain(await root.get_workspace_info(ws))
    sc.eq("get_workspace_info id", info.get("id"), ws)
    sc.eq("get_workspace_info description", info.get("description"), "interop scenario workspace")
    sc.check("get_workspace_info owners include root", "root" in (info.get("owners") or []), info.get("owners"))
    sc.eq("get_workspace_info persistent defaults to false", info.get("persistent"), False)
    wss = [w["id"] for w in await root.list_workspaces()]
    sc.check("list_workspaces (root) includes the new workspace and public", ws in wss and "public" in wss, wss)
    await sc.expect_error("create_workspace again without overwrite fails",
                          root.create_workspace({"name": ws, "description": "again"}),
                          [f"Workspace already exists: {ws}"])
    await sc.expect_error("create_workspace with an upper-case name fails",
                          root.create_workspace({"name": "Bad-Name"}), ["Invalid workspace name"])
    await sc.expect_error("get_workspace_info of an unknown workspace fails",
                          root.get_workspace_info("nonexistent-interop-ws"), ["not found"])

    t = await root.generate_token({"workspace": ws})
    c = await sc.connect("client with a root-minted token", client_id="tok-joiner", workspace=ws, token=t)
    sc.eq("root-minted token joins the created workspace", c.config.workspace, ws)
    await c.register_service({"id": "joined", "config": {"visibility": "public"}, "f": lambda: "joined"})
    svc = await root.get_service(f"{ws}/joined")
    sc.eq("root calls a service in the created workspace", await svc.f(), "joined")
    lst = [w["id"] for w in await c.list_workspaces()]
    sc.check("list_workspaces from inside includes the created workspace", ws in lst, lst)
    await sc.disconnect(c)
    gone = await wait_until(lambda: _missing(root, ws), timeout=5)
    sc.check("a non-persistent workspace is unloaded when its last client leaves", gone, "")

    ws2 = f"interop-del-{secrets.token_hex(4)}"
    await root.create_workspace({"name": ws2, "description": "to delete"})
    r = await sc.attempt("delete_workspace", root.delete_workspace(ws2))
    sc.check("delete_workspace returns None", r is None, r)
    await sc.expect_error("a deleted workspace is gone", root.get_workspace_info(ws2), ["not found"])


async def _missing(root, ws):
    try:
        await root.get_workspace_info(ws)
        return False
    except Exception as e:  # noqa: BLE001
        return "not found" in str(e)


async def main(sc):
    await part1(sc)
    await part2(sc)


if __name__ == "__main__":
    Scenario("tokens_workspaces", needs_root=True).run(main)
