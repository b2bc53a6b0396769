"""require_context: a service registered with `require_context: True` receives the
server-stamped caller context (`ws` = caller's workspace, `from` = "{ws}/{client_id}",
`to`, `user` = caller's UserInfo); with the list form `require_context: ["f"]` only `f`
gets a context (`g` gets None)."""

from _common import Scenario, plain


def make_ctx_fn():
    # a distinct function object per registration (the stock client shares wrappers per object)
    def f(x=None, context=None):
        return {"x": x, "context": context}
    return f


async def main(sc):
    provider = await sc.connect("provider", client_id="ctx-provider")
    other = await sc.connect("consumer in another workspace", client_id="ctx-other")
    wa = provider.config.workspace
    wb = other.config.workspace
    token = await provider.generate_token()
    same = await sc.connect("consumer in the provider's workspace", client_id="ctx-same",
                            workspace=wa, token=token)

    await provider.register_service({
        "id": "ctx-all", "config": {"visibility": "public", "require_context": True},
        "f": make_ctx_fn(),
    })
    await provider.register_service({
        "id": "ctx-list", "config": {"visibility": "public", "require_context": ["f"]},
        "f": make_ctx_fn(), "g": make_ctx_fn(),
    })
    await provider.register_service({
        "id": "ctx-none", "config": {"visibility": "public"}, "f": make_ctx_fn(),
    })

    svc = await other.get_service(f"{wa}/ctx-all")
    r = plain(await svc.f(1))
    ctx = r.get("context") or {}
    sc.eq("argument still arrives with a context", r.get("x"), 1)
    sc.eq("context.ws is the caller's workspace (other ws)", ctx.get("ws"), wb)
    sc.eq("context.from is '{caller ws}/{caller client id}'", ctx.get("from"), f"{wb}/ctx-other")
    sc.eq("context.to is the provider", ctx.get("to"), f"{wa}/ctx-provider")
    user = ctx.get("user") or {}
    sc.eq("context.user.id is the caller's user", user.get("id"), other.config.user["id"])
    sc.eq("context.user.is_anonymous", user.get("is_anonymous"), True)
    sc.check("context.user.scope.workspaces grants the caller its own workspace",
             (user.get("scope") or {}).get("workspaces", {}).get(wb) == "a", user.get("scope"))

    svc = await same.get_service("ctx-all")
    ctx = plain(await svc.f(2)).get("context") or {}
    sc.eq("same-workspace caller: context.ws = provider workspace", ctx.get("ws"), wa)
    sc.eq("same-workspace caller: context.from", ctx.get("from"), f"{wa}/ctx-same")
    u = ctx.get("user") or {}
    sc.eq("same-workspace caller: user is the token's user", u.get("id"), same.config.user["id"])
    sc.eq("same-workspace caller: user.parent is the token issuer", u.get("parent"),
          provider.config.user["id"])
    sc.eq("same-workspace caller: user permission on the workspace is rw",
          (u.get("scope") or {}).get("workspaces", {}).get(wa), "rw")

    svc = await other.get_service(f"{wa}/ctx-list")
    rf = plain(await svc.f(3))
    rg = plain(await svc.g(4))
    sc.check("list form: f (listed) gets the context",
             isinstance(rf.get("context"), dict) and rf["context"].get("ws") == wb, rf)
    sc.check("list form: g (not listed) gets context=None", rg.get("context") is None and rg.get("x") == 4, rg)

    svc = await other.get_service(f"{wa}/ctx-none")
    r = plain(await svc.f(5))
    sc.check("without require_context no context is passed", r.get("context") is None, r)

    info = await other.get_service_info(f"{wa}/ctx-list")
    sc.eq("require_context list is kept in the service record", plain(info["config"]).get("require_context"), ["f"])


if __name__ == "__main__":
    Scenario("require_context").run(main)
