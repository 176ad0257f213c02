"""Domain XML for a job, built with ElementTree (never by formatting strings).

Every value is validated before it gets here (job ids, PCI addresses, paths, kernel
arguments); ElementTree escapes what it writes.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sandfleet.workers.drivers.base import LABEL_GPUS, LABEL_JOB_ID, LABEL_POOL, LABEL_WORKER_ID
from sandfleet.workers.drivers.vm.guest import CHANNEL_NAME, WAIT_ARGUMENT
from sandfleet.workers.gpu.inventory import normalize_pci_address

METADATA_NS = "https://sandfleet.dev/xmlns/libvirt/job/1"
METADATA_PREFIX = "sandfleet"
DEFAULT_MEMORY_BYTES = 256 * 2**20
BASE_CMDLINE = "console=ttyS0 quiet loglevel=0 panic=-1"


@dataclass(frozen=True, kw_only=True)
class DomainPlan:
    name: str
    domain_type: str  # kvm on real hosts, qemu (TCG) under nested virtualisation, test
    job_id: str
    worker_id: str
    gpus: tuple[str, ...]  # claimed GPU UUIDs, for the metadata
    pci_devices: tuple[str, ...]  # the same GPUs' PCI addresses, as hostdevs
    cpu: float | None
    memory_bytes: int | None
    kernel: str
    initrd: Path
    cmdline: str
    console_log: Path
    disk: Path | None = None
    disk_format: str = "qcow2"
    labels: Mapping[str, str] = field(default_factory=dict)  # the job's, for `find`
    pool: str = ""  # a warm guest's pool profile (its job_id is "" until a job takes it)
    # A warm guest's job channel: the unix socket of its virtio-serial port, on the host.
    job_channel: Path | None = None


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attributes)
    if text is not None:
        element.text = text
    return element


def metadata_element(
    job_id: str,
    worker_id: str,
    gpus: tuple[str, ...],
    *,
    pool: str = "",
    taken_at: datetime | None = None,
    labels: Mapping[str, str] | None = None,
) -> ET.Element:
    """`<sandfleet:job id= worker= gpus= [pool=] [taken=] [labels=]>`: whose the domain
    is (a warm guest's owner changes). The job's labels are one JSON text in ASCII: a
    label may hold any character, and XML cannot hold some (control characters)."""
    attributes = {"id": job_id, "worker": worker_id, "gpus": ",".join(gpus)}
    if pool:
        attributes["pool"] = pool
    if taken_at is not None:
        attributes["taken"] = taken_at.isoformat()
    if labels:
        attributes["labels"] = json.dumps(dict(labels), ensure_ascii=True)
    return ET.Element(f"{{{METADATA_NS}}}job", attributes)


def metadata_xml(element: ET.Element) -> str:
    """An element of ours as text for libvirt's `setMetadata`, which puts it in our
    namespace itself (and refuses one that is in a namespace already)."""
    plain = ET.Element(_local(element.tag), element.attrib)
    plain.extend(ET.Element(_local(child.tag), child.attrib) for child in element)
    return ET.tostring(plain, encoding="unicode")


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def domain_xml(plan: DomainPlan) -> str:
    domain = ET.Element("domain", type=plan.domain_type)
    _sub(domain, "name", plan.name)
    metadata = _sub(domain, "metadata")
    metadata.append(
        metadata_element(plan.job_id, plan.worker_id, plan.gpus, pool=plan.pool, labels=plan.labels)
    )
    memory_kib = (plan.memory_bytes or DEFAULT_MEMORY_BYTES) // 1024
    _sub(domain, "memory", str(memory_kib), unit="KiB")
    _sub(domain, "vcpu", str(max(1, math.ceil(plan.cpu or 1))))

    os_element = _sub(domain, "os")
    _sub(os_element, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_element, "kernel", plan.kernel)
    _sub(os_element, "initrd", str(plan.initrd))
    waits = WAIT_ARGUMENT if plan.job_channel is not None else ""
    _sub(os_element, "cmdline", " ".join(filter(None, (BASE_CMDLINE, plan.cmdline, waits))))

    features = _sub(domain, "features")
    _sub(features, "acpi")  # without ACPI a guest's power-off only halts its CPUs
    _sub(features, "apic")

    # The guest powers off when its job ends; a reboot or a crash ends it too.
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(domain, event, "destroy")

    devices = _sub(domain, "devices")
    if plan.disk is not None:
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type="qcow2")
        _sub(disk, "source", file=str(plan.disk))
        _sub(disk, "target", dev="vda", bus="virtio")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(plan.console_log))
    _sub(serial, "target", port="0")
    if plan.job_channel is not None:
        devices.append(job_channel_element(plan.job_channel))
    for address in plan.pci_devices:
        devices.append(hostdev_element(address))
    _sub(devices, "memballoon", model="none")
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    return ET.tostring(domain, encoding="unicode")


def job_channel_element(socket: Path) -> ET.Element:
    """A virtio-serial port named CHANNEL_NAME whose host end is a unix socket that
    libvirt makes at `socket` (the worker connects to it)."""
    channel = ET.Element("channel", type="unix")
    _sub(channel, "source", mode="bind", path=str(socket))
    _sub(channel, "target", type="virtio", name=CHANNEL_NAME)
    return channel


def hostdev_element(pci_address: str) -> ET.Element:
    """A managed PCI passthrough device for one GPU."""
    domain, bus, slot_function = normalize_pci_address(pci_address).split(":")
    slot, function = slot_function.split(".")
    hostdev = ET.Element("hostdev", mode="subsystem", type="pci", managed="yes")
    source = _sub(hostdev, "source")
    _sub(
        source,
        "address",
        domain=f"0x{domain}",
        bus=f"0x{bus}",
        slot=f"0x{slot}",
        function=f"0x{function}",
    )
    return hostdev


def parse_metadata(xml_text: str) -> dict[str, str]:
    """The job metadata of a domain (`virDomainGetMetadata` element): its attributes."""
    element = ET.fromstring(xml_text)
    return {key: value for key, value in element.attrib.items()}


@dataclass(frozen=True)
class DomainOwner:
    labels: dict[str, str]  # the job's own labels under sandfleet's (no job id: untaken)
    taken_at: datetime | None  # when a job took this warm guest


def read_owner(xml_text: str) -> DomainOwner:
    """Whose a domain is, from its metadata element; ET.ParseError if it is not XML."""
    element = ET.fromstring(xml_text)
    meta = element.attrib
    labels = _labels(meta.get("labels", ""))
    labels |= {LABEL_WORKER_ID: meta.get("worker", ""), LABEL_GPUS: meta.get("gpus", "")}
    if meta.get("id"):
        labels[LABEL_JOB_ID] = meta["id"]
    if meta.get("pool"):
        labels[LABEL_POOL] = meta["pool"]
    return DomainOwner(labels=labels, taken_at=_time_or_none(meta.get("taken", "")))


def _labels(text: str) -> dict[str, str]:
    """The job's labels as written (none if unreadable: the guest cannot write them)."""
    try:
        labels = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(labels, dict):
        return {}
    return {str(name): str(value) for name, value in labels.items()}


def _time_or_none(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def dac_group(capabilities_xml: str, domain_type: str) -> str | None:
    """The group QEMU runs as for `domain_type` guests (`+64055`, or a name), from
    libvirt's host capabilities; None where no DAC label is set (root, the test driver)."""
    host = ET.fromstring(capabilities_xml).find("host")
    models = host.findall("secmodel") if host is not None else []
    for model in models:
        if model.findtext("model") != "dac":
            continue
        for label in model.findall("baselabel"):
            if label.get("type") == domain_type and label.text and ":" in label.text:
                group = label.text.split(":", 1)[1]
                return None if group in ("+0", "root") else group
    return None
