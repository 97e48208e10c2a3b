"""The two seed rules as the tests expect them: ids, the exact IR their loaders produce, the
reading of seeds/004's rendering, and a record that fires the Sigma seed."""

from __future__ import annotations

from ruletag.rules.ir import And, Cidr, IsNull, Logsource, Match, Node, Not, Or, Rule, Wild

SIGMA_ID = "c649a6c7-cd8c-4a78-9c04-000fc76df954"
SIGMA_NAME = "Potentially Suspicious Wuauclt Network Connection"
EQL_ID = "8e2485b6-a74f-411b-bf7f-38b819f3a846"
EQL_NAME = "Potential WSUS Abuse for Lateral Movement"

ANY, ONE = Wild.ANY, Wild.ONE

#: A Sysmon network connection of wuauclt that fires the Sigma seed.
SIGMA_HIT = {
    "EventID": 3, "Channel": "Microsoft-Windows-Sysmon/Operational",
    "Image": "C:\\Windows\\System32\\wuauclt.exe",
    "CommandLine": "wuauclt.exe /UpdateDeploymentProvider x.dll /RunHandlerComServer",
    "DestinationIp": "8.8.8.8", "Initiated": "true",
}  # fmt: skip

#: The Sigma seed's ``filter_main_ip`` and ``filter_main_msrange`` networks.
LOCAL_NETS = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::1/128",
    "fe80::/10",
    "fc00::/7",
)
MICROSOFT_NETS = (
    "20.184.0.0/13",
    "20.192.0.0/10",
    "23.79.0.0/16",
    "51.10.0.0/15",
    "51.103.0.0/16",
    "51.104.0.0/15",
    "52.224.0.0/11",
)
_UUS = (
    ":\\Windows\\UUS\\Packages\\Preview\\amd64\\updatedeploy.dll /ClassId",
    ":\\Windows\\UUS\\amd64\\UpdateDeploy.dll /ClassId",
)
_WINSXS = (":\\Windows\\WinSxS\\", "\\UpdateDeploy.dll /ClassId ")


def contains(field: str | None, text: str, cased: bool = False) -> Match:
    """``field|contains: text`` as IR."""
    return Match(field, (ANY, text, ANY), cased)


def sigma_seed_condition() -> Node:
    """The exact condition ``load_sigma_file`` builds from the Sigma seed."""
    cl = "CommandLine"
    return And(
        (
            contains("Image", "wuauclt"),
            contains(cl, " /RunHandlerComServer"),
            Not(
                Or(
                    (
                        Cidr("DestinationIp", LOCAL_NETS + MICROSOFT_NETS),
                        *(contains(cl, text) for text in _UUS),
                        And(tuple(contains(cl, text) for text in _WINSXS)),
                        IsNull(cl),
                        Match(cl, ()),
                    )
                )
            ),
        )
    )


def sigma_seed(winsxs_all: bool = False) -> Rule:
    """Hand-built IR of the Sigma seed as rendered in seeds/004 (the expected file's reading).

    The rendering flattens ``filter_main_winsxs`` (``contains|all`` in the YAML) into two
    separate filters; ``winsxs_all=True`` builds the YAML's AND instead.
    """
    cl = "CommandLine"
    selection = And((contains("Image", "wuauclt"), contains(cl, " /RunHandlerComServer")))
    uus = Or(tuple(contains(cl, text) for text in _UUS))
    winsxs_parts = tuple(contains(cl, text) for text in _WINSXS)
    winsxs = And(winsxs_parts) if winsxs_all else Or(winsxs_parts)
    ip = Cidr("DestinationIp", LOCAL_NETS)
    msrange = Cidr("DestinationIp", MICROSOFT_NETS)
    filters = Or((ip, msrange, uus, winsxs, IsNull(cl), Match(cl, ())))
    return Rule(
        id=SIGMA_ID,
        name=SIGMA_NAME,
        source="sigma",
        condition=And((selection, Not(filters))),
        logsource=Logsource(product="windows", category="network_connection"),
    )


def eql_seed_condition() -> Node:
    """The exact condition ``load_elastic_file`` builds from the Elastic seed's EQL query."""
    return And(
        (
            Match("event.category", ("process",), cased=True),
            Match("host.os.type", ("windows",), cased=True),
            Match("event.type", ("start",), cased=True),
            Match("process.parent.name", ("wuauclt.exe",)),
            Match(
                "process.executable",
                (ONE, ":\\Windows\\SoftwareDistribution\\Download\\Install\\", ANY),
            ),
            Or(
                (
                    Match("process.name", ("psexec64.exe",)),
                    Match("process.pe.original_file_name", ("psexec.c",)),
                )
            ),
        )
    )


def eql_seed() -> Rule:
    """Hand-built IR of potential_wsus_abuse_for_lateral_movement.toml."""
    return Rule(id=EQL_ID, name=EQL_NAME, source="elastic", condition=eql_seed_condition())
