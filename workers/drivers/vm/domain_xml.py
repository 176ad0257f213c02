"""Domain XML for a job, built with ElementTree (never by formatting strings).

Every value is validated before it gets here (job ids, PCI addresses, paths, kernel
arguments); ElementTree escapes what it writes.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

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


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attributes)
    if text is not None:
        element.text = text
    return element


def metadata_element(job_id: str, worker_id: str, gpus: tuple[str, ...]) -> ET.Element:
    return ET.Element(
        f"{{{METADATA_NS}}}job", {"id": job_id, "worker": worker_id, "gpus": ",".join(gpus)}
    )


def domain_xml(plan: DomainPlan) -> str:
    domain = ET.Element("domain", type=plan.domain_type)
    _sub(domain, "name", plan.name)
    metadata = _sub(domain, "metadata")
    metadata.append(metadata_element(plan.job_id, plan.worker_id, plan.gpus))
    memory_kib = (plan.memory_bytes or DEFAULT_MEMORY_BYTES) // 1024
    _sub(domain, "memory", str(memory_kib), unit="KiB")
    _sub(domain, "vcpu", str(max(1, math.ceil(plan.cpu or 1))))

    os_element = _sub(domain, "os")
    _sub(os_element, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_element, "kernel", plan.kernel)
    _sub(os_element, "initrd", str(plan.initrd))
    _sub(os_element, "cmdline", f"{BASE_CMDLINE} {plan.cmdline}".strip())

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
    for address in plan.pci_devices:
        devices.append(hostdev_element(address))
    _sub(devices, "memballoon", model="none")
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    return ET.tostring(domain, encoding="unicode")


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
    """The job metadata of a domain (`virDomainGetMetadata` element) as sandbox labels."""
    element = ET.fromstring(xml_text)
    return {key: value for key, value in element.attrib.items()}


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
