"""visibility: public / protected (default) / unlisted / protected+authorized_workspaces
services seen from the same workspace, from an authorized workspace B and from an
unrelated workspace C (server spec §5.4, rpc-protocol §12 #43): get_service_info,
get_service, calls, list_services with and without include_unlisted, `*` listings, the
upstream error texts, provider-side enforcement of protected methods (a function proxy
handed to an outsider is refused), and re-registration switching the grants."""

from _common import Scenario, plain

DENIED = "Permission denied for non-public service in workspace"


def ids_of(records, ws):
    return sorted(r["id"].split("/", 1)[1] for r in records if r["id"].startswith(ws + "/"))


async def main(sc):
    p = await sc.connect("provider (workspace A)", client_id="vis-provider")
    b = await sc.connect("client B", client_id="vis-b")
    c = await sc.connect("client C", client_id="vis-c")
    wa, wb, wc = p.config.workspace, b.config.workspace, c.config.workspace
    denied = f"{DENIED} {wa}"
    token = await p.generate_token()
    same = await sc.connect("same-workspace client", client_id="vis-same", workspace=wa, token=token)

    await p.register_service({"id": "pub", "config": {"visibility": "public"}, "f": lambda x=None: ("pub", x)})
    await p.register_service({"id": "prot", "config": {"visibility": "protected"}, "f": lambda x=None: ("prot", x)})
    await p.register_service({"id": "unl", "config": {"visibility": "unlisted"}, "f": lambda x=None: ("unl", x)})
    await p.register_service({"id": "auth", "config": {"visibility": "protected", "authorized_workspaces": [wb]},
                              "f": lambda x=None: ("auth", x)})
    await p.register_service({"id": "defvis", "f": lambda x=None: ("defvis", x)})

    info = await p.get_service_info("defvis")
    sc.eq("no visibility given -> stored as protected", info["config"]["visibility"], "protected")

    matrix = {
        "same-ws": (same, {"pub": True, "prot": True, "unl": True, "auth": True, "defvis": True}),
        "B (authorized)": (b, {"pub": True, "prot": False, "unl": True, "auth": True, "defvis": False}),
        "C (unrelated)": (c, {"pub": True, "prot": False, "unl": True, "auth": False, "defvis": False}),
    }
    for who, (cl, allowed) in matrix.items():
        for sid, ok in allowed.items():
            if ok:
                svc = await sc.attempt(f"{who}: get_service({sid})", cl.get_service(f"{wa}/{sid}"))
                if svc is not None:
                    r = await sc.attempt(f"{who}: call {sid}.f", svc.f(1))
                    sc.eq(f"{who}: get_service + call {sid}", list(r) if r is not None else None, [sid, 1])
            else:
                await sc.expect_error(f"{who}: get_service({sid}) denied", cl.get_service(f"{wa}/{sid}"), [denied])
                await sc.expect_error(f"{who}: get_service_info({sid}) denied",
                                      cl.get_service_info(f"{wa}/{sid}"), [denied])

    # authorized_workspaces is visible to the owner's workspace, hidden from the grantee
    i_same = plain(await same.get_service_info(f"{wa}/auth"))
    sc.eq("same-ws sees authorized_workspaces", i_same["config"].get("authorized_workspaces"), [wb])
    i_b = plain(await b.get_service_info(f"{wa}/auth"))
    sc.check("B (grantee) does not see the authorized_workspaces list",
             "authorized_workspaces" not in i_b["config"] or i_b["config"]["authorized_workspaces"] is None,
             i_b["config"])

    # listings
    base = ["vis-provider:built-in"]
    sc.eq("same-ws list_services() (own ws): pub, prot, auth, defvis (+built-ins), no unl",
          [s for s in ids_of(await same.list_services(), wa) if s.startswith("vis-provider:")],
          sorted(base + ["vis-provider:pub", "vis-provider:prot", "vis-provider:auth", "vis-provider:defvis"]))
    sc.eq("same-ws list_services(include_unlisted=True) adds unl",
          [s for s in ids_of(await same.list_services(None, include_unlisted=True), wa) if s.startswith("vis-provider:")],
          sorted(base + ["vis-provider:pub", "vis-provider:prot", "vis-provider:auth", "vis-provider:defvis",
                         "vis-provider:unl"]))
    sc.eq("B list_services(A): pub, auth (+built-ins)",
          [s for s in ids_of(await b.list_services(wa), wa) if s.startswith("vis-provider:")],
          sorted(base + ["vis-provider:pub", "vis-provider:auth"]))
    sc.eq("C list_services(A): pub (+built-ins)",
          [s for s in ids_of(await c.list_services(wa), wa) if s.startswith("vis-provider:")],
          sorted(base + ["vis-provider:pub"]))
    for who, cl in (("B", b), ("C", c)):
        await sc.expect_error(f"{who}: list_services(A, include_unlisted=True) refused",
                              cl.list_services({"workspace": wa}, include_unlisted=True),
                              ["Cannot include unlisted services from workspace"])
    allstar = await c.list_services("*")
    sc.eq("C list_services('*') shows only A's public services",
          [s for s in ids_of(allstar, wa) if s.startswith("vis-provider:")], sorted(base + ["vis-provider:pub"]))
    await sc.expect_error("list_services('*', include_unlisted=True) refused",
                          c.list_services({"workspace": "*"}, include_unlisted=True),
                          ["Cannot include unlisted services when searching all workspaces"])
    await sc.expect_error("list_services({workspace: '*', visibility: 'protected'}) refused",
                          c.list_services({"workspace": "*", "visibility": "protected"}),
                          ["Cannot list protected or unlisted services in all workspaces"])
    await sc.expect_error("unknown query key refused", c.list_services({"bogus": 1}), ["Invalid query keys"])

    # provider-side enforcement: B relays the protected function proxy of `auth` to C
    auth_svc = await b.get_service(f"{wa}/auth")
    await b.register_service({"id": "relay", "config": {"visibility": "public"},
                              "get_fn": lambda: auth_svc.f})
    relay = await c.get_service(f"{wb}/relay")
    fn = await sc.attempt("C obtains the relayed function", relay.get_fn())
    if fn is not None:
        await sc.expect_error("C calling the relayed protected function is refused by the provider",
                              fn(9), ["Permission denied for invoking protected method", "Permission denied"])

    # re-registration switches the grant from B to C
    await p.register_service({"id": "auth", "config": {"visibility": "protected", "authorized_workspaces": [wc]},
                              "f": lambda x=None: ("auth2", x)}, overwrite=True)
    svc = await sc.attempt("after re-registration C may get auth", c.get_service(f"{wa}/auth"))
    if svc is not None:
        sc.eq("after re-registration C calls auth", list(await svc.f(2)), ["auth2", 2])
    await sc.expect_error("after re-registration B is denied", b.get_service(f"{wa}/auth"), [denied])
    await p.register_service({"id": "auth", "config": {"visibility": "protected", "authorized_workspaces": []},
                              "f": lambda x=None: ("auth3", x)}, overwrite=True)
    await sc.expect_error("empty authorized_workspaces: C denied", c.get_service(f"{wa}/auth"), [denied])
    svc = await same.get_service("auth")
    sc.eq("empty authorized_workspaces: same workspace still allowed", list(await svc.f(3)), ["auth3", 3])

    # client-side validation of the stock client (no server round trip, kept for completeness)
    await sc.expect_error("authorized_workspaces with visibility public is refused",
                          p.register_service({"id": "bad", "config": {"visibility": "public",
                                                                       "authorized_workspaces": [wb]},
                                              "f": lambda: 1}),
                          ["authorized_workspaces can only be set when visibility is 'protected'"])


if __name__ == "__main__":
    Scenario("visibility").run(main)
