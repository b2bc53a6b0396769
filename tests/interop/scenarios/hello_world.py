"""hello_world: a provider in one (anonymous) workspace registers a public service, a consumer
in another workspace looks it up by its full id and calls it."""

from _common import Scenario, plain


def hello(name):
    """Say hello."""
    return "Hello " + name


async def main(sc):
    provider = await sc.connect("provider", client_id="hello-provider")
    consumer = await sc.connect("consumer", client_id="hello-consumer")
    wa = provider.config.workspace
    wb = consumer.config.workspace
    sc.check("connection_info.workspace is set", bool(wa) and bool(wb), f"{wa!r} {wb!r}")
    sc.check("two anonymous clients get two different workspaces", wa != wb, f"both {wa}")
    sc.check("workspace of anonymous client is ws-user-anonymouz-*",
             wa.startswith("ws-user-anonymouz-"), wa)
    sc.eq("connection_info.client_id", provider.config.client_id, "hello-provider")
    sc.check("connection_info.manager_id present", bool(provider.config.get("manager_id")),
             provider.config)
    sc.check("connection_info.hypha_version present", bool(provider.config.get("hypha_version")),
             provider.config)
    sc.check("public_base_url is http(s)",
             str(provider.config.get("public_base_url", "")).startswith("http"), provider.config)

    info = await provider.register_service({
        "id": "hello-world",
        "name": "Hello World",
        "description": "hello-world example",
        "config": {"visibility": "public"},
        "hello": hello,
    })
    sc.eq("registered service id is {ws}/{cid}:hello-world", info.id, f"{wa}/hello-provider:hello-world")

    svc = await sc.attempt("consumer get_service(full id)", consumer.get_service(info.id))
    if svc is not None:
        sc.eq("get_service returns the full id", svc.id, info.id)
        sc.eq("get_service config.workspace = provider workspace", svc.config.get("workspace"), wa)
        sc.check("get_service config.url points at the HTTP proxy",
                 str(svc.config.get("url", "")).endswith(f"/{wa}/services/hello-provider:hello-world"),
                 svc.config.get("url"))
        sc.eq("get_service name", svc.name, "Hello World")
        sc.eq("call hello('John')", await svc.hello("John"), "Hello John")
        sc.eq("second call hello('Ann')", await svc.hello("Ann"), "Hello Ann")
        sc.eq("remote function keeps __doc__", (svc.hello.__doc__ or "").strip(), "Say hello.")

    svc2 = await sc.attempt("consumer get_service('{ws}/hello-world')",
                            consumer.get_service(f"{wa}/hello-world"))
    if svc2 is not None:
        sc.eq("call via '{ws}/hello-world'", await svc2.hello("Bo"), "Hello Bo")

    # A bare id is resolved in the caller's own workspace only (spec 5.2).
    await sc.expect_error("bare 'hello-world' from another workspace is not found",
                          consumer.get_service("hello-world"), ["Service not found"])

    info2 = await sc.attempt("get_service_info(full id)", consumer.get_service_info(info.id))
    if info2 is not None:
        d = plain(info2)
        sc.eq("service info id", d.get("id"), info.id)
        sc.eq("service info visibility", d.get("config", {}).get("visibility"), "public")
        sc.check("service info has service_schema.hello",
                 "hello" in (d.get("service_schema") or {}), d.get("service_schema"))

    # The provider's own workspace lists it (bare id resolution works there).
    own = await provider.list_services()
    sc.check("provider list_services() contains it", any(s["id"] == info.id for s in own),
             [s["id"] for s in own])
    other = await consumer.list_services(wa)
    sc.check("consumer list_services(provider ws) contains the public service",
             any(s["id"] == info.id for s in other), [s["id"] for s in other])


if __name__ == "__main__":
    Scenario("hello_world").run(main)
