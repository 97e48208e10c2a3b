"""Generate realistic forward-protocol traffic for the load benchmark, once, into a file.

The file holds ready PackedForward frames back to back (``[tag, bin entries, {size, chunk}]``,
one tag and 1000 entries per chunk, each with a chunk id), so the load driver only writes
bytes. A JSON index next to it (``<file>.json``) lists every frame's offset, length, record
count and chunk id.

Traffic: flat Sysmon events (process creation, network connection, file creation), Windows
Security logons, ECS-shaped Elastic Defend process and network events, Linux syslog/auditd
and parsed web access logs, about 1 KB per record on average. A configurable fraction
(default 0.5%) are *positives*: the seed positives of
``tests/data/captures/windows-events.jsonl`` and events built from the literals of a few corpus
rules (shadow-copy deletion, python pty spawn, web path traversal), which trip at least one
rule.

``--mix b`` draws from a second, independently written mix: other hosts, users, domain,
processes, command lines and web paths, ECS Linux process events, and far more Linux and web
(about 60%) than Windows; ``--no-positives`` plants none. The default (mix a, positives) is
byte for byte what it was before these options existed.

Entry time is an EventTime whose seconds are ``T0 + chunk index``: the sink reads the first
entry's seconds to know which chunk arrived (for the latency measurement) without touching
the records.

    python bench/gen_traffic.py -o /tmp/ruletag-traffic.bin --chunks 100
    python bench/gen_traffic.py -o /tmp/t.bin --check ../shared/rules   # measure match rate
    python bench/gen_traffic.py -o /tmp/b.bin --mix b --no-positives
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

HERE = Path(__file__).resolve().parent
CAPTURES = HERE.parent / "tests" / "data" / "captures"
CAPTURE = CAPTURES / "windows-events.jsonl"
EXPECTED = CAPTURES / "windows-events.expected.json"

#: Seconds of the first chunk's EventTime (2024-05-01T12:00:00Z).
T0 = 1714564800
CHUNK_ENTRIES = 1000

Record = dict[str, Any]

HOSTS = [f"WS-{n:04d}" for n in range(1, 60)] + [f"SRV-APP{n:02d}" for n in range(1, 12)]
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "svc_backup"]
DOMAIN = "CORP"
#: (image, command line template, parent image, code signer) of ordinary Windows processes.
WIN_PROCS = [
    (
        r"C:\Program Files\Google\Chrome\Application\chrome.exe",
        '"{img}" --type=renderer --field-trial-handle=1784,{n},{m} --lang=en-US /prefetch:1',
        r"C:\Windows\explorer.exe",
        "Google LLC",
    ),
    (
        r"C:\Program Files\Microsoft Office\root\Office16\WINWORD.EXE",
        '"{img}" /n "C:\\Users\\Public\\Documents\\report-{n}.docx"',
        r"C:\Windows\explorer.exe",
        "Microsoft Corporation",
    ),
    (
        r"C:\Windows\System32\svchost.exe",
        r"C:\Windows\system32\svchost.exe -k netsvcs -p -s Schedule",
        r"C:\Windows\System32\services.exe",
        "Microsoft Windows",
    ),
    (
        r"C:\Windows\System32\RuntimeBroker.exe",
        r"C:\Windows\System32\RuntimeBroker.exe "
        "-Embedding",
        r"C:\Windows\System32\svchost.exe",
        "Microsoft Windows",
    ),
    (
        r"C:\Program Files\Microsoft VS Code\Code.exe",
        '"{img}" --type=utility --utility-sub-type=node.mojom.NodeService --lang=en-US {n}',
        r"C:\Windows\explorer.exe",
        "Microsoft Corporation",
    ),
    (
        r"C:\Windows\System32\SearchProtocolHost.exe",
        '"{img}" Global\\UsGthrFltPipeMssGthrPipe{n}_ Global\\UsGthrCtrlFltPipeMssGthrPipe{n} 1 '
        "-2147483646",
        r"C:\Windows\System32\SearchIndexer.exe",
        "Microsoft Windows",
    ),
    (
        r"C:\Program Files\Mozilla Firefox\firefox.exe",
        '"{img}" -contentproc -childID {n} -isForBrowser -prefsLen {m} tab',
        r"C:\Windows\explorer.exe",
        "Mozilla Corporation",
    ),
    (
        r"C:\Windows\System32\taskhostw.exe",
        "taskhostw.exe Install $(Arg0)",
        r"C:\Windows\System32\svchost.exe",
        "Microsoft Windows",
    ),
    (
        r"C:\Windows\System32\notepad.exe",
        r'"C:\Windows\system32\notepad.exe" '
        r"C:\Users\Public\notes-{n}.txt",
        r"C:\Windows\explorer.exe",
        "Microsoft Windows",
    ),
]
SYSMON_PROCS = [p for p in WIN_PROCS if "Mozilla" not in p[3] and "Google" not in p[3]]
NET_PROCS = [WIN_PROCS[i][0] for i in (0, 2, 4, 6)]
LINUX_PROCS = [
    ("/usr/bin/ls", "ls -la /var/log/nginx"),
    ("/usr/bin/git", "git fetch origin"),
    ("/usr/sbin/logrotate", "/usr/sbin/logrotate /etc/logrotate.conf"),
    ("/usr/bin/rsync", "rsync -a /srv/data/ /mnt/backup/data/"),
    ("/usr/local/bin/node", "node /srv/app/server.js --port 3000"),
]
PATHS = [
    "/",
    "/index.html",
    "/api/v1/orders",
    "/api/v1/users/{n}",
    "/static/js/app.{n}.js",
    "/static/css/site.css",
    "/healthz",
    "/login",
    "/search",
    "/products/{n}",
]
QUERIES = ["", "page={n}", "q=winter+jacket&sort=price", "id={n}&lang=en", "ref=newsletter"]
AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
]

# Mix B: a second, independently written traffic mix (other hosts, users, processes, command
# lines, paths, and another share of Windows, Linux and web), to check that what the
# pre-filter learns on one mix holds on another (bench/bench_prefilter_mix.py).
HOSTS_B = (
    [f"LAPTOP-{n:05X}" for n in range(4096, 4196)]
    + [f"DC{n:02d}" for n in range(1, 4)]
    + [f"SQL-PROD{n}" for n in range(1, 6)]
)
USERS_B = ["m.jensen", "t.okafor", "l.moreau", "s.ito", "r.novak", "p.silva", "k.schmidt", "sqlsvc"]
DOMAIN_B = "NORTHWIND"
WIN_PROCS_B = [
    (
        r"C:\Program Files (x86)\Microsoft\Edge\Application\msedge.exe",
        '"{img}" --type=gpu-process --gpu-preferences={n} --mojo-platform-channel-handle={m} '
        "/prefetch:2",
        r"C:\Program Files (x86)\Microsoft\Edge\Application\msedge.exe",
        "Microsoft Corporation",
    ),
    (
        r"C:\Program Files\Microsoft OneDrive\OneDrive.exe",
        '"{img}" /background',
        r"C:\Windows\explorer.exe",
        "Microsoft Corporation",
    ),
    (
        r"C:\Program Files\Microsoft Office\root\Office16\EXCEL.EXE",
        '"{img}" "C:\\Users\\Public\\Documents\\budget-{n}.xlsx"',
        r"C:\Windows\explorer.exe",
        "Microsoft Corporation",
    ),
    (
        r"C:\Program Files\Microsoft Office\root\Office16\OUTLOOK.EXE",
        '"{img}" /recycle',
        r"C:\Windows\explorer.exe",
        "Microsoft Corporation",
    ),
    (
        r"C:\Windows\System32\backgroundTaskHost.exe",
        '"{img}" -ServerName:BackgroundTaskHost.WebAccountProvider{n}',
        r"C:\Windows\System32\svchost.exe",
        "Microsoft Windows",
    ),
    (
        r"C:\Windows\System32\wbem\WmiPrvSE.exe",
        r"C:\Windows\system32\wbem\wmiprvse.exe -secured -Embedding",
        r"C:\Windows\System32\svchost.exe",
        "Microsoft Windows",
    ),
    (
        r"C:\Program Files\Git\cmd\git.exe",
        "git.exe fetch --all --prune --jobs={n}",
        r"C:\Program Files\Microsoft VS Code\Code.exe",
        "Johannes Schindelin",
    ),
    (
        r"C:\Program Files\Microsoft SQL Server\MSSQL16.MSSQLSERVER\MSSQL\Binn\sqlservr.exe",
        '"{img}" -sMSSQLSERVER',
        r"C:\Windows\System32\services.exe",
        "Microsoft Corporation",
    ),
]
LINUX_PROCS_B = [
    ("/usr/bin/apt-get", "apt-get -q update"),
    ("/usr/bin/systemctl", "systemctl status nginx.service"),
    ("/usr/bin/du", "du -sh /var/lib/postgresql"),
    ("/usr/sbin/nginx", "nginx -s reload"),
    ("/usr/bin/java", "java -Xmx2g -jar /opt/billing/billing-service.jar"),
    ("/usr/lib/postgresql/15/bin/pg_dump", "pg_dump -Fc -f /srv/dumps/orders.dump orders"),
]
PATHS_B = [
    "/cart",
    "/checkout/step-{n}",
    "/account/orders/{n}",
    "/images/p/{n}.webp",
    "/graphql",
    "/favicon.ico",
    "/help/shipping",
]
QUERIES_B = ["", "session={n}", "color=blue&size=m", "utm_source=mail&utm_campaign=spring"]
AGENTS_B = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/125.0.0.0 Safari/537.36 Edg/125.0.2535.51",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/125.0.6422.53 Mobile Safari/537.36",
]


@dataclass(frozen=True)
class Mix:
    """What one traffic mix draws from: hosts, users, processes, web paths, source shares."""

    name: str
    hosts: list[str]
    users: list[str]
    domain: str
    win_procs: list[tuple[str, str, str, str]]
    sysmon_procs: list[tuple[str, str, str, str]]
    net_procs: list[str]
    linux_procs: list[tuple[str, str]]
    paths: list[str]
    queries: list[str]
    agents: list[str]
    #: (tag, weight, generator) of the benign traffic
    sources: list[tuple[str, float, Callable[..., Record]]] = field(default_factory=list)


def _guid(rnd: random.Random) -> str:
    h = f"{rnd.getrandbits(128):032x}"
    return f"{{{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}}}"


def _ip(rnd: random.Random, private: bool = True) -> str:
    if private:
        return f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
    return (
        f"{rnd.choice([34, 35, 104, 142, 151])}.{rnd.randrange(256)}.{rnd.randrange(256)}."
        f"{rnd.randrange(1, 255)}"
    )


def _utc(seq: int) -> str:
    s = seq // 1000
    return f"2024-05-01 {12 + s // 3600 % 12:02d}:{s // 60 % 60:02d}:{s % 60:02d}.{seq % 1000:03d}"


LOGON_NOTE = (
    "\r\n\r\nThis event is generated when a logon session is created. It is generated on the "
    "computer that was accessed.\r\n\r\nThe logon type field indicates the kind of logon "
    "that occurred. The most common types are 2 (interactive) and 3 (network)."
)


def _render(title: str, r: Record) -> str:
    """A rendered event text, like the ``Message`` of Winlogbeat or Fluent Bit winevtlog."""
    skip = (
        "Channel",
        "Provider_Name",
        "Provider_Guid",
        "Level",
        "Task",
        "Opcode",
        "Keywords",
        "Version",
        "EventRecordID",
        "Computer",
        "EventID",
    )
    body = "\r\n".join(f"{k}: {v}" for k, v in r.items() if k not in skip)
    return f"{title}:\r\n{body}"


def _shipper(rnd: random.Random, host: str, path: str) -> Record:
    """The metadata a log shipper (Filebeat/Elastic Agent) adds to a line it read."""
    return {
        "agent": {
            "type": "filebeat",
            "version": "8.13.2",
            "name": host,
            "id": f"{rnd.getrandbits(128):032x}",
            "ephemeral_id": f"{rnd.getrandbits(128):032x}",
        },
        "log": {"file": {"path": path}, "offset": rnd.randrange(10**9)},
        "input": {"type": "filestream"},
        "ecs": {"version": "8.11.0"},
        "cloud": {
            "provider": "aws",
            "region": "eu-west-1",
            "availability_zone": "eu-west-1b",
            "instance": {"id": f"i-{rnd.getrandbits(64):016x}"},
        },
    }


def _sysmon_base(rnd: random.Random, seq: int, eid: int, mix: Mix) -> Record:
    host = rnd.choice(mix.hosts)
    return {
        "EventID": eid,
        "Channel": "Microsoft-Windows-Sysmon/Operational",
        "Provider_Name": "Microsoft-Windows-Sysmon",
        "Provider_Guid": "{5770385f-c22a-43e0-bf4c-06f5698ffbd9}",
        "Computer": f"{host}.corp.example.com",
        "EventRecordID": 100000 + seq,
        "Level": 4,
        "Task": eid,
        "Opcode": 0,
        "Keywords": "0x8000000000000000",
        "Version": 5,
        "RuleName": "-",
        "UtcTime": _utc(seq),
    }


def sysmon_process(rnd: random.Random, seq: int, mix: Mix | None = None) -> Record:
    mix = mix or MIX_A
    # browsers excluded: Elastic masquerading rules want a code signature Sysmon lacks
    img, cmd, parent, signer = rnd.choice(mix.sysmon_procs)
    n, m = rnd.randrange(1, 99999), rnd.randrange(1, 99999)
    user = rnd.choice(mix.users)
    r = _sysmon_base(rnd, seq, 1, mix)
    r.update(
        {
            "ProcessGuid": _guid(rnd),
            "ProcessId": rnd.randrange(1000, 30000),
            "Image": img,
            "FileVersion": f"{rnd.randrange(1, 125)}.0.{n}.{m % 300}",
            "Description": img.rsplit("\\", 1)[-1].rsplit(".", 1)[0],
            "Product": "Microsoft® Windows® Operating System",
            "Company": signer,
            "OriginalFileName": img.rsplit("\\", 1)[-1],
            "CommandLine": cmd.format(img=img, n=n, m=m),
            "CurrentDirectory": "C:\\Windows\\system32\\",
            "User": f"{mix.domain}\\{user}",
            "LogonGuid": _guid(rnd),
            "LogonId": f"0x{rnd.getrandbits(24):x}",
            "TerminalSessionId": rnd.randrange(0, 3),
            "IntegrityLevel": rnd.choice(["Medium", "High", "System"]),
            "Hashes": f"SHA1={rnd.getrandbits(160):040X},MD5={rnd.getrandbits(128):032X},"
            f"SHA256={rnd.getrandbits(256):064X},IMPHASH={rnd.getrandbits(128):032X}",
            "ParentProcessGuid": _guid(rnd),
            "ParentProcessId": rnd.randrange(400, 9000),
            "ParentImage": parent,
            "ParentCommandLine": parent,
            "ParentUser": f"{mix.domain}\\{user}",
        }
    )
    return r


def sysmon_network(rnd: random.Random, seq: int, mix: Mix | None = None) -> Record:
    mix = mix or MIX_A
    img = rnd.choice(mix.net_procs)
    r = _sysmon_base(rnd, seq, 3, mix)
    r.update(
        {
            "ProcessGuid": _guid(rnd),
            "ProcessId": rnd.randrange(1000, 30000),
            "Image": img,
            "User": f"{mix.domain}\\{rnd.choice(mix.users)}",
            "Protocol": "tcp",
            "Initiated": "true",
            "SourceIsIpv6": "false",
            "SourceIp": _ip(rnd),
            "SourceHostname": f"{rnd.choice(mix.hosts)}.corp.example.com",
            "SourcePort": rnd.randrange(49152, 65535),
            "SourcePortName": "-",
            "DestinationIsIpv6": "false",
            "DestinationIp": _ip(rnd, private=rnd.random() < 0.5),
            "DestinationHostname": rnd.choice(
                ["www.example.com", "cdn.example.net", "-", "login.example.org", "api.example.com"]
            ),
            "DestinationPort": rnd.choice([443, 443, 8443]),
            "DestinationPortName": "https",
        }
    )
    r["Message"] = _render("Network connection detected", r)
    return r


def sysmon_file(rnd: random.Random, seq: int, mix: Mix | None = None) -> Record:
    mix = mix or MIX_A
    img = rnd.choice(mix.net_procs)
    user = rnd.choice(mix.users)
    r = _sysmon_base(rnd, seq, 11, mix)
    r.update(
        {
            "ProcessGuid": _guid(rnd),
            "ProcessId": rnd.randrange(1000, 30000),
            "Image": img,
            "TargetFilename": f"C:\\Users\\{user}\\AppData\\Local\\Temp\\"
            f"tmp{rnd.getrandbits(32):08x}.{rnd.choice(['tmp', 'log', 'json', 'dat'])}",
            "CreationUtcTime": _utc(seq),
            "User": f"{mix.domain}\\{user}",
        }
    )
    r["Message"] = _render("File created", r)
    return r


def security_logon(rnd: random.Random, seq: int, mix: Mix | None = None) -> Record:
    mix = mix or MIX_A
    host = rnd.choice(mix.hosts)
    r = {
        "EventID": 4624,
        "Channel": "Security",
        "Provider_Name": "Microsoft-Windows-Security-Auditing",
        "Provider_Guid": "{54849625-5478-4994-a5ba-3e3b0328c30d}",
        "Computer": f"{host}.corp.example.com",
        "EventRecordID": 500000 + seq,
        "Level": 0,
        "Task": 12544,
        "Keywords": "0x8020000000000000",
        "SubjectUserSid": "S-1-5-18",
        "SubjectUserName": f"{host}$",
        "SubjectDomainName": mix.domain,
        "SubjectLogonId": "0x3e7",
        "TargetUserSid": f"S-1-5-21-{rnd.getrandbits(30)}-{rnd.getrandbits(30)}-1{seq % 1000:03d}",
        "TargetUserName": rnd.choice(mix.users),
        "TargetDomainName": mix.domain,
        "TargetLogonId": f"0x{rnd.getrandbits(28):x}",
        "LogonType": rnd.choice([2, 3, 3, 3, 10]),
        "LogonProcessName": "Kerberos",
        "AuthenticationPackageName": "Kerberos",
        "WorkstationName": "-",
        "LogonGuid": _guid(rnd),
        "TransmittedServices": "-",
        "LmPackageName": "-",
        "KeyLength": 0,
        "ProcessId": "0x0",
        "ProcessName": "-",
        "IpAddress": _ip(rnd),
        "IpPort": str(rnd.randrange(49152, 65535)),
        "ImpersonationLevel": "%%1833",
        "ElevatedToken": "%%1843",
    }
    r["Message"] = _render("An account was successfully logged on.", r) + LOGON_NOTE
    return r


def _ecs_common(rnd: random.Random, seq: int, category: str, etype: str, mix: Mix) -> Record:
    host = rnd.choice(mix.hosts)
    return {
        "@timestamp": f"2024-05-01T{_utc(seq)[11:]}Z",
        "event": {
            "id": f"evt-{seq:09d}",
            "kind": "event",
            "type": [etype],
            "category": [category],
            "module": "endpoint",
            "dataset": f"endpoint.events.{category}",
            "created": "2024-05-01T12:00:00Z",
        },
        "host": {
            "name": host,
            "hostname": host.lower(),
            "id": f"{rnd.getrandbits(128):032x}",
            "os": {
                "type": "windows",
                "family": "windows",
                "name": "Windows 10 Pro",
                "version": "22H2",
                "kernel": "22H2 (10.0.19045.4291)",
            },
            "ip": [_ip(rnd)],
        },
        "agent": {"type": "endpoint", "version": "8.13.2", "id": f"{rnd.getrandbits(64):016x}"},
        "ecs": {"version": "8.11.0"},
        "user": {"name": rnd.choice(mix.users), "domain": mix.domain},
        "data_stream": {
            "type": "logs",
            "dataset": f"endpoint.events.{category}",
            "namespace": "default",
        },
    }


def ecs_process(rnd: random.Random, seq: int, mix: Mix | None = None) -> Record:
    mix = mix or MIX_A
    img, cmd, parent, signer = rnd.choice(mix.win_procs)
    n, m = rnd.randrange(1, 99999), rnd.randrange(1, 99999)
    name = img.rsplit("\\", 1)[-1]
    r = _ecs_common(rnd, seq, "process", "start", mix)
    r["process"] = {
        "pid": rnd.randrange(1000, 30000),
        "entity_id": f"{rnd.getrandbits(96):024x}",
        "name": name,
        "executable": img,
        "args": [img, f"--n={n}"],
        "command_line": cmd.format(img=img, n=n, m=m),
        "working_directory": "C:\\Windows\\system32\\",
        "parent": {
            "pid": rnd.randrange(400, 9000),
            "name": parent.rsplit("\\", 1)[-1],
            "executable": parent,
        },
        "pe": {"original_file_name": name, "company": signer},
        "code_signature": {
            "subject_name": signer,
            "trusted": True,
            "exists": True,
            "status": "trusted",
        },
        "hash": {"sha256": f"{rnd.getrandbits(256):064x}"},
    }
    return r


def ecs_network(rnd: random.Random, seq: int, mix: Mix | None = None) -> Record:
    mix = mix or MIX_A
    img = rnd.choice(mix.net_procs)
    r = _ecs_common(rnd, seq, "network", "connection", mix)
    r["process"] = {
        "pid": rnd.randrange(1000, 30000),
        "name": img.rsplit("\\", 1)[-1],
        "executable": img,
    }
    r["source"] = {"ip": _ip(rnd), "port": rnd.randrange(49152, 65535)}
    r["destination"] = {"ip": _ip(rnd, private=False), "port": 443}
    r["network"] = {"transport": "tcp", "type": "ipv4", "direction": "egress"}
    return r


def ecs_linux_process(rnd: random.Random, seq: int, mix: Mix | None = None) -> Record:
    """An ECS process start on a Linux host (Elastic Defend / Auditbeat shape)."""
    mix = mix or MIX_B
    exe, cmd = rnd.choice(mix.linux_procs)
    host = f"k8s-node-{rnd.randrange(1, 40):02d}"
    r = _ecs_common(rnd, seq, "process", "start", mix)
    r["host"].update(
        name=host,
        hostname=host,
        os={"type": "linux", "family": "debian", "name": "Debian GNU/Linux", "version": "12"},
    )
    r["user"] = {"name": rnd.choice(["root", "deploy", "postgres", "www-data"])}
    r["process"] = {
        "pid": rnd.randrange(1000, 300000),
        "entity_id": f"{rnd.getrandbits(96):024x}",
        "name": exe.rsplit("/", 1)[-1],
        "executable": exe,
        "args": cmd.split(" "),
        "args_count": len(cmd.split(" ")),
        "command_line": cmd,
        "working_directory": rnd.choice(["/", "/srv", "/opt/billing", "/var/lib/postgresql"]),
        "parent": {"pid": rnd.randrange(1, 9000), "name": "bash", "executable": "/usr/bin/bash"},
    }
    return r


def linux_syslog(rnd: random.Random, seq: int, mix: Mix | None = None) -> Record:
    mix = mix or MIX_A
    host = f"web{rnd.randrange(1, 20):02d}"
    user = rnd.choice(mix.users)
    msgs = [
        f"Accepted publickey for {user} from {_ip(rnd)} port {rnd.randrange(1024, 65535)} "
        f"ssh2: ED25519 SHA256:{base64.b64encode(rnd.randbytes(32)).decode()[:43]}",
        f"pam_unix(cron:session): session opened for user {user}(uid={rnd.randrange(1000, 2000)})"
        " by (uid=0)",
        f"Started Session {rnd.randrange(1, 9999)} of User {user}.",
        f"Received disconnect from {_ip(rnd)} port {rnd.randrange(1024, 65535)}:11: "
        "disconnected by user",
    ]
    return {
        "host": host,
        "ident": rnd.choice(["sshd", "CRON", "systemd"]),
        "pid": str(rnd.randrange(100, 60000)),
        "message": rnd.choice(msgs),
        "facility": "authpriv",
        "priority": "info",
        "hostname": f"{host}.example.com",
        "os": {"type": "linux"},
        **_shipper(rnd, host, "/var/log/auth.log"),
    }


def linux_auditd(rnd: random.Random, seq: int, mix: Mix | None = None) -> Record:
    mix = mix or MIX_A
    exe, cmd = rnd.choice(mix.linux_procs)
    args = cmd.split(" ")
    r: Record = {
        "type": "EXECVE",
        "node": f"app{rnd.randrange(1, 20):02d}.example.com",
        "msg": f"audit(1714564800.{seq % 1000:03d}:{seq})",
        "argc": str(len(args)),
        "exe": exe,
        "comm": exe.rsplit("/", 1)[-1],
        "uid": "1000",
        "auid": "1000",
        "ses": str(rnd.randrange(1, 500)),
        "key": "exec",
        "cwd": f"/home/{rnd.choice(mix.users)}",
        "syscall": "59",
        "success": "yes",
        **_shipper(rnd, f"app{rnd.randrange(1, 20):02d}", "/var/log/audit/audit.log"),
    }
    for i, a in enumerate(args):
        r[f"a{i}"] = a
    return r


def web_access(rnd: random.Random, seq: int, mix: Mix | None = None) -> Record:
    mix = mix or MIX_A
    n = rnd.randrange(1, 99999)
    path = rnd.choice(mix.paths).format(n=n)
    query = rnd.choice(mix.queries).format(n=n)
    return {
        "date": "2024-05-01",
        "time": _utc(seq)[11:19],
        "c-ip": _ip(rnd, private=False),
        "cs-method": rnd.choice(["GET", "GET", "GET", "POST"]),
        "cs-uri-stem": path,
        "cs-uri-query": query,
        "sc-status": rnd.choice([200, 200, 200, 304, 404]),
        "sc-bytes": rnd.randrange(200, 90000),
        "time-taken": rnd.randrange(1, 900),
        "cs-host": "shop.example.com",
        "cs-user-agent": rnd.choice(mix.agents),
        "cs-referer": "https://shop.example.com/",
        "x-forwarded-for": _ip(rnd, private=False),
        "upstream": f"10.1.0.{rnd.randrange(2, 30)}:8080",
        "request_id": f"{rnd.getrandbits(64):x}",
        **_shipper(rnd, "web01", "/var/log/nginx/access.log"),
    }


#: (tag, weight, generator) of the benign traffic.
SOURCES: list[tuple[str, float, Callable[[random.Random, int], Record]]] = [
    ("windows.sysmon.process", 0.15, sysmon_process),
    ("windows.sysmon.network", 0.15, sysmon_network),
    ("windows.sysmon.file", 0.10, sysmon_file),
    ("windows.security", 0.10, security_logon),
    ("endpoint.process", 0.15, ecs_process),
    ("endpoint.network", 0.05, ecs_network),
    ("linux.auth", 0.10, linux_syslog),
    ("linux.audit", 0.05, linux_auditd),
    ("web.access", 0.15, web_access),
]


MIX_A = Mix(
    name="a",
    hosts=HOSTS,
    users=USERS,
    domain=DOMAIN,
    win_procs=WIN_PROCS,
    sysmon_procs=SYSMON_PROCS,
    net_procs=NET_PROCS,
    linux_procs=LINUX_PROCS,
    paths=PATHS,
    queries=QUERIES,
    agents=AGENTS,
    sources=SOURCES,
)
MIX_B = Mix(
    name="b",
    hosts=HOSTS_B,
    users=USERS_B,
    domain=DOMAIN_B,
    win_procs=WIN_PROCS_B,
    sysmon_procs=WIN_PROCS_B[1:],  # Edge's signer is not in Sysmon
    net_procs=[WIN_PROCS_B[i][0] for i in (0, 1, 3, 7)],
    linux_procs=LINUX_PROCS_B,
    paths=PATHS_B,
    queries=QUERIES_B,
    agents=AGENTS_B,
    # far more Linux and web than mix A, less Windows
    sources=[
        ("windows.sysmon.process", 0.08, sysmon_process),
        ("windows.sysmon.network", 0.04, sysmon_network),
        ("windows.sysmon.file", 0.04, sysmon_file),
        ("windows.security", 0.09, security_logon),
        ("endpoint.process", 0.08, ecs_process),
        ("endpoint.network", 0.04, ecs_network),
        ("linux.process", 0.15, ecs_linux_process),
        ("linux.auth", 0.14, linux_syslog),
        ("linux.audit", 0.10, linux_auditd),
        ("web.access", 0.24, web_access),
    ],
)
MIXES = {"a": MIX_A, "b": MIX_B}


def positives() -> list[Record]:
    """Records that trip a rule: the capture's expected positives plus corpus-rule literals."""
    out: list[Record] = []
    if CAPTURE.exists() and EXPECTED.exists():
        expected = json.loads(EXPECTED.read_text())["records"]
        lines = CAPTURE.read_text(encoding="utf-8").splitlines()
        for item in expected:
            ids = item["expected_rule_ids"]
            if ids and not any(i.startswith("logsource-dependent") for i in ids):
                out.append(json.loads(lines[item["line"] - 1]))
    rnd = random.Random(7)
    # sigma proc_creation_win_susp_shadow_copies_deletion
    r = sysmon_process(rnd, 1)
    r.update(
        Image=r"C:\Windows\System32\vssadmin.exe",
        OriginalFileName="VSSADMIN.EXE",
        CommandLine="vssadmin.exe delete shadows /all /quiet",
    )
    out.append(r)
    # sigma proc_creation_lnx_python_pty_spawn (ECS-shaped Linux process event)
    r = ecs_process(rnd, 2)
    r["host"]["os"] = {"type": "linux", "family": "debian", "name": "Debian"}
    r["process"].update(
        name="python3",
        executable="/usr/bin/python3",
        command_line="python3 -c 'import pty; pty.spawn(\"/bin/bash\")'",
        args=["python3", "-c", 'import pty; pty.spawn("/bin/bash")'],
    )
    out.append(r)
    # sigma web_path_traversal_exploitation_attempt
    r = web_access(rnd, 3)
    r["cs-uri-query"] = "file=../../../etc/passwd"
    out.append(r)
    return out


def _packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True)


def _entry(packer: msgpack.Packer, seconds: int, nanos: int, record: Record) -> bytes:
    ts = msgpack.ExtType(0, seconds.to_bytes(4, "big") + nanos.to_bytes(4, "big"))
    return packer.pack([ts, record])


def _frame(tag: str, entries: bytes, count: int, chunk_id: bytes) -> bytes:
    """One PackedForward frame: ``[tag, bin entries, {"size": n, "chunk": id}]``."""
    return msgpack.packb(
        [tag, entries, {"size": count, "chunk": chunk_id.decode()}], use_bin_type=True
    )


def generate(
    out: Path,
    chunks: int,
    match_fraction: float = 0.005,
    seed: int = 1,
    entries_per_chunk: int = CHUNK_ENTRIES,
    mix: str = "a",
) -> dict[str, Any]:
    """Write ``chunks`` frames to ``out`` and the index to ``out.json``; return the index.

    ``mix``: which traffic mix (``a``, the default, or ``b``); ``match_fraction`` 0 plants
    no positives."""
    rnd = random.Random(seed)
    packer = _packer()
    pos = positives()
    the_mix = MIXES[mix]
    tags = [s[0] for s in the_mix.sources]
    weights = [s[1] for s in the_mix.sources]
    gens = {s[0]: s[2] for s in the_mix.sources}
    index: list[list[Any]] = []
    total_bytes = entry_bytes = planted = 0
    offset = 0
    with out.open("wb") as f:
        for c in range(chunks):
            tag = rnd.choices(tags, weights)[0]
            gen = gens[tag]
            parts = []
            for j in range(entries_per_chunk):
                seq = c * entries_per_chunk + j
                if rnd.random() < match_fraction:
                    rec = dict(rnd.choice(pos))
                    planted += 1
                else:
                    rec = gen(rnd, seq, the_mix)
                parts.append(_entry(packer, T0 + c, j * 1000 + rnd.randrange(1000), rec))
            entries = b"".join(parts)
            cid = base64.b64encode(rnd.randbytes(16))
            frame = _frame(tag, entries, entries_per_chunk, cid)
            f.write(frame)
            index.append([offset, len(frame), entries_per_chunk, cid.decode(), tag])
            offset += len(frame)
            total_bytes += len(frame)
            entry_bytes += len(entries)
    meta = {
        "t0": T0,
        "records": chunks * entries_per_chunk,
        "chunks": index,
        "bytes": total_bytes,
        "entry_bytes": entry_bytes,
        "avg_record_bytes": round(entry_bytes / max(1, chunks * entries_per_chunk), 1),
        "planted_positives": planted,
        "match_fraction": match_fraction,
        "seed": seed,
    }
    if mix != "a":  # the default mix's index stays as it was
        meta["mix"] = mix
    Path(str(out) + ".json").write_text(json.dumps(meta))
    return meta


def load_index(path: Path) -> dict[str, Any]:
    """The index written next to a traffic file."""
    return json.loads(Path(str(path) + ".json").read_text())


def check(path: Path, rule_paths: list[str]) -> dict[str, Any]:
    """Run the traffic through the rule filter in-process; count matched records."""
    from ruletag.protocol import iter_entries
    from ruletag.rules.loader import compile_rules
    from ruletag.rules.matcher import Matcher

    table, _ = compile_rules(rule_paths)
    matcher = Matcher(table)
    data = path.read_bytes()
    matched = 0
    per_rule: dict[str, int] = {}
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=2**31 - 1)
    unpacker.feed(data)
    for _tag, entries, _opts in unpacker:
        hits = matcher.match_entries(entries, iter_entries(entries))
        matched += len(hits)
        for rule_ids in hits.values():
            for k in rule_ids:
                rid = table.rules[k].id
                per_rule[rid] = per_rule.get(rid, 0) + 1
    top = sorted(per_rule.items(), key=lambda kv: -kv[1])[:15]
    return {"matched_records": matched, "rules_fired": len(per_rule), "top": top}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", default="/tmp/ruletag-bench/traffic.bin")
    ap.add_argument("--chunks", type=int, default=100, help="chunks of 1000 entries")
    ap.add_argument("--match-fraction", type=float, default=0.005)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--mix",
        choices=sorted(MIXES),
        default="a",
        help="traffic mix: a (default) or b (other hosts, processes, command lines, and far "
        "more Linux and web)",
    )
    ap.add_argument(
        "--no-positives", action="store_true", help="plant no positives (--match-fraction 0)"
    )
    ap.add_argument(
        "--check",
        nargs="+",
        metavar="RULES",
        help="afterwards, count records that match these rules (in-process)",
    )
    ns = ap.parse_args(argv)
    out = Path(ns.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fraction = 0.0 if ns.no_positives else ns.match_fraction
    meta = generate(out, ns.chunks, fraction, ns.seed, mix=ns.mix)
    print(
        f"{out}: {meta['records']} records in {len(meta['chunks'])} chunks, "
        f"{meta['bytes'] / 1e6:.1f} MB, {meta['avg_record_bytes']} B/record, "
        f"{meta['planted_positives']} planted positives"
    )
    if ns.check:
        print(json.dumps(check(out, ns.check), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
