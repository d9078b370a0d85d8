#!/usr/bin/env python3
"""Generate data/nanp_regions.tsv: the US state or Canadian province of each NANP area code.

From libphonenumber's English geocoding data, as shipped in PyPI's `phonenumbers` package
(Apache-2.0, `phonenumbers/geodata/`). The script fetches the wheel with pip (no install) and
imports the data from it. An area code (`1NPA`) takes the state or province its own description
names ("California", "Ontario", "New York, NY"); without one, the one every description of the
prefixes under it agrees on ("San Francisco, CA"):

    <1 + area code>\t<ISO 3166-2 subdivision, e.g. US-CA or CA-ON>

Area codes that are not geographic (toll-free, 5XX), or whose descriptions name no single
subdivision, are left out: for them callgate knows the country only, and applies the strictest
rules of the country. Other NANP countries (Jamaica, Puerto Rico, ...) have their own region from
the numbering plan and need no line.

Usage: python3 scripts/gen_regions.py [--version X.Y.Z] [--out data/nanp_regions.tsv]
"""
import argparse
import glob
import os
import subprocess
import sys
import tempfile

US = {
    "Alabama": "AL", "Alaska": "AK", "Arizona": "AZ", "Arkansas": "AR", "California": "CA",
    "Colorado": "CO", "Connecticut": "CT", "Delaware": "DE", "Florida": "FL", "Georgia": "GA",
    "Hawaii": "HI", "Idaho": "ID", "Illinois": "IL", "Indiana": "IN", "Iowa": "IA",
    "Kansas": "KS", "Kentucky": "KY", "Louisiana": "LA", "Maine": "ME", "Maryland": "MD",
    "Massachusetts": "MA", "Michigan": "MI", "Minnesota": "MN", "Mississippi": "MS",
    "Missouri": "MO", "Montana": "MT", "Nebraska": "NE", "Nevada": "NV", "New Hampshire": "NH",
    "New Jersey": "NJ", "New Mexico": "NM", "New York": "NY", "North Carolina": "NC",
    "North Dakota": "ND", "Ohio": "OH", "Oklahoma": "OK", "Oregon": "OR", "Pennsylvania": "PA",
    "Rhode Island": "RI", "South Carolina": "SC", "South Dakota": "SD", "Tennessee": "TN",
    "Texas": "TX", "Utah": "UT", "Vermont": "VT", "Virginia": "VA", "Washington": "WA",
    "West Virginia": "WV", "Wisconsin": "WI", "Wyoming": "WY", "Washington D.C.": "DC",
    "Washington, D.C.": "DC", "District of Columbia": "DC", "Washington State": "WA",
}
CA = {
    "Alberta": "AB", "British Columbia": "BC", "Manitoba": "MB", "New Brunswick": "NB",
    "Newfoundland and Labrador": "NL", "Nova Scotia": "NS", "Ontario": "ON",
    "Prince Edward Island": "PE", "Quebec": "QC", "Saskatchewan": "SK",
    "Northwest Territories": "NT", "Nunavut": "NU", "Yukon": "YT",
    "British Colombia": "BC",  # sic, in the data
    "Nova Scotia/Prince Edward Island": None, "Yukon/Northwest Territories/Nunavut": None,
}


def subdivision(description):
    """The ISO 3166-2 code a description names, if one."""
    if description in US:
        return "US-" + US[description]
    if description in CA:
        return CA[description] and "CA-" + CA[description]
    if ", " in description:
        tail = description.rsplit(", ", 1)[1].strip()
        if tail in US.values():
            return "US-" + tail
        if tail in CA.values():
            return "CA-" + tail
        if tail in US:
            return "US-" + US[tail]
        if tail in CA:
            return CA[tail] and "CA-" + CA[tail]
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", default=None, help="phonenumbers version (default: latest)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "nanp_regions.tsv"))
    args = ap.parse_args()
    spec = "phonenumbers" + (f"=={args.version}" if args.version else "")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec], check=True)
        wheel = glob.glob(os.path.join(tmp, "phonenumbers-*.whl"))[0]
        version = os.path.basename(wheel).split("-")[1]
        sys.path.insert(0, wheel)
        from phonenumbers.geodata import GEOCODE_DATA
        own, under = {}, {}
        for prefix, names in GEOCODE_DATA.items():
            if not prefix.startswith("1") or len(prefix) < 4 or "en" not in names:
                continue
            code = subdivision(names["en"])
            if len(prefix) == 4:
                own[prefix] = code
            elif code:
                under.setdefault(prefix[:4], set()).add(code)
    lines = []
    for area in sorted(set(own) | set(under)):
        found = own.get(area)
        if not found and len(under.get(area, ())) == 1:
            found = next(iter(under[area]))
        if found:
            lines.append(f"{area}\t{found}\n")
    if len(lines) < 300:
        sys.exit(f"only {len(lines)} area codes found: the data's format may have changed")
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(f"# NANP area code -> US state or Canadian province (ISO 3166-2), from libphonenumber's\n")
        f.write(f"# geocoding data via PyPI phonenumbers {version} (Apache-2.0)\n")
        f.write("# generated by scripts/gen_regions.py; do not edit by hand\n")
        f.writelines(lines)
    print(f"wrote {len(lines)} area codes from phonenumbers {version} to {args.out}")


if __name__ == "__main__":
    main()
