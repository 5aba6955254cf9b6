#!/usr/bin/env python3
"""Read (and switch) one DLMS/COSEM meter with Gurux's independent client library.

Gurux (gurux-dlms from PyPI, pinned in requirements.txt) is used only as the protocol
engine: it builds every request and parses every answer (GXDLMSClient: snrmRequest,
aarqRequest/parseAareResponse, read/method, readRowsByRange, getData with GXReplyData,
receiverReady for HDLC segments and GET data blocks). The bytes travel over a plain
`socket`, so no gurux-net is needed.

What is read, in this order, on one association:
  0.0.42.0.0.255  logical device name (class 1, attr 2)
  0.0.1.0.0.255   clock (class 8, attr 2)
  1.0.1.8.0.255   +A (class 3, attrs 3 then 2)
  1.0.2.8.0.255   -A (class 3, attrs 3 then 2)
  1.0.99.1.0.255  load profile (class 7, attrs 3 and 4, then attr 2 by range: selector 1
                  restricted on the clock column)
  0.0.96.3.10.255 disconnect control (class 70): attrs 2/3/4, then each --switch action
                  (method 1 remote_disconnect / method 2 remote_reconnect, parameter
                  integer 0) followed by reading attrs 2 and 3 back.
then RLRQ (and DISC on HDLC). --trace shows every frame in hex on stderr.

HLS-GMAC (--auth hls-gmac, suite 0, authenticated and encrypted) follows the standard:
passes 3/4 run when the AARE says authentication-required; an AARE that omits that
diagnostic is reported as a non-standard server.

Prints ONE JSON object on stdout. Exits 0 on success; on failure prints a JSON object
with "error" on stdout, a one-line explanation on stderr, and exits non-zero:
  2 bad arguments, 3 Gurux not installed, 4 network/timeout, 5 DLMS-level failure.

Example:
  python3 tests/interop/gurux_client.py --host 127.0.0.1 --port 4059 --transport wrapper \
      --logical 1 --client 16 --auth none \
      --profile-from 2024-06-01T08:00:00+01:00 --profile-to 2024-06-01T11:00:00+01:00 \
      --switch disconnect,reconnect
"""

import argparse
import datetime
import json
import socket
import sys
import time

EXIT_ARGS, EXIT_NO_GURUX, EXIT_NETWORK, EXIT_DLMS = 2, 3, 4, 5

try:
    from gurux_dlms import (
        GXByteBuffer,
        GXDateTime,
        GXDLMSClient,
        GXDLMSConfirmedServiceError,
        GXDLMSException,
        GXDLMSExceptionResponse,
        GXReplyData,
    )
    from gurux_dlms.enums import Authentication, InterfaceType, RequestTypes, Security
    from gurux_dlms.objects import (
        GXDLMSClock,
        GXDLMSData,
        GXDLMSDisconnectControl,
        GXDLMSProfileGeneric,
        GXDLMSRegister,
    )
    from gurux_dlms.secure import GXDLMSSecureClient
except ImportError as exc:  # pragma: no cover - exercised only on a machine without Gurux
    sys.stderr.write(
        "gurux_client.py: the Gurux DLMS library is not installed ({}). Run .ci/run, or\n"
        "  python3 -m pip install -r tests/interop/requirements.txt\n".format(exc)
    )
    print(json.dumps({"error": "gurux-dlms not installed: {}".format(exc)}))
    sys.exit(EXIT_NO_GURUX)

LDN = "0.0.42.0.0.255"
CLOCK = "0.0.1.0.0.255"
IMPORT = "1.0.1.8.0.255"
EXPORT = "1.0.2.8.0.255"
LOAD_PROFILE = "1.0.99.1.0.255"
DISCONNECT_CONTROL = "0.0.96.3.10.255"


class Failure(Exception):
    """A failure with the exit code it maps to."""

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code


def hexs(data):
    return bytes(data).hex().upper()


class Session:
    """One TCP connection and one Gurux client: plain-socket I/O around Gurux's engine."""

    def __init__(self, args):
        self.args = args
        self.trace = args.trace
        interface = InterfaceType.WRAPPER if args.transport == "wrapper" else InterfaceType.HDLC
        if args.transport == "wrapper":
            # The wrapper's destination wPort is the logical device.
            server_address = args.logical
        else:
            # Upper HDLC address = logical device, lower = physical address.
            server_address = GXDLMSClient.getServerAddress(args.logical, args.physical)
        auth = {
            "none": Authentication.NONE,
            "lls": Authentication.LOW,
            "hls-gmac": Authentication.HIGH_GMAC,
        }[args.auth]
        # GXDLMSSecureClient defaults to short-name referencing: always ask for LN.
        self.client = GXDLMSSecureClient(
            True, args.client, server_address, auth, args.password if args.auth == "lls" else None, interface
        )
        if args.auth == "hls-gmac":
            cipher = self.client.ciphering
            cipher.security = Security.AUTHENTICATION_ENCRYPTION
            cipher.systemTitle = bytearray(args.system_title)
            cipher.blockCipherKey = bytearray(args.guek)
            cipher.authenticationKey = bytearray(args.gak)
            cipher.invocationCounter = args.invocation_counter
        self.sock = None
        self.pending = bytearray()  # bytes received beyond the last complete answer
        self.aare = None
        self.exchanges = 0

    # --- I/O ---------------------------------------------------------------------------

    def connect(self):
        try:
            self.sock = socket.create_connection((self.args.host, self.args.port), timeout=self.args.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise Failure(EXIT_NETWORK, "cannot connect to {}:{}: {}".format(self.args.host, self.args.port, exc))

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _send(self, data):
        if self.trace:
            sys.stderr.write("TX {}\n".format(hexs(data)))
        try:
            self.sock.sendall(bytes(data))
        except OSError as exc:
            raise Failure(EXIT_NETWORK, "send failed: {}".format(exc))

    def _recv(self):
        try:
            chunk = self.sock.recv(4096)
        except socket.timeout:
            raise Failure(EXIT_NETWORK, "no answer within {} s".format(self.args.timeout))
        except OSError as exc:
            raise Failure(EXIT_NETWORK, "receive failed: {}".format(exc))
        if not chunk:
            raise Failure(EXIT_NETWORK, "the meter closed the connection")
        if self.trace:
            sys.stderr.write("RX {}\n".format(hexs(chunk)))
        return chunk

    def exchange(self, data, reply):
        """Send one frame/WPDU and feed what comes back to Gurux until it has a whole one."""
        self.exchanges += 1
        self._send(data)
        buf = GXByteBuffer()
        if self.pending:
            buf.set(self.pending)
            self.pending = bytearray()
        notify = GXReplyData()
        deadline = time.monotonic() + self.args.timeout
        while True:
            if buf.size > buf.position:
                try:
                    done = self.client.getData(buf, reply, notify)
                except GXDLMSException:
                    raise
                except GXDLMSExceptionResponse as exc:
                    raise Failure(EXIT_DLMS, "the meter answered exception-response ({}): {}".format(exc, hexs(buf.array())))
                except GXDLMSConfirmedServiceError as exc:
                    raise Failure(EXIT_DLMS, "the meter answered confirmed-service-error ({}): {}".format(exc, hexs(buf.array())))
                except Exception as exc:  # Gurux raises plain exceptions on malformed input
                    raise Failure(EXIT_DLMS, "Gurux could not parse the answer {}: {}".format(hexs(buf.array()), exc))
                if done:
                    break
            if time.monotonic() > deadline:
                raise Failure(EXIT_NETWORK, "no complete answer within {} s".format(self.args.timeout))
            buf.set(self._recv())
        if buf.size > buf.position:
            self.pending = bytearray(buf.array()[buf.position :])
        if reply.error != 0:
            raise GXDLMSException(reply.error)

    def request(self, data, reply=None):
        """One confirmed service, across HDLC segments and GET data blocks."""
        if reply is None:
            reply = GXReplyData()
        if data is None:
            return reply
        if isinstance(data, list):
            for message in data:
                reply.clear()
                self.request(message, reply)
            return reply
        self.exchange(data, reply)
        while reply.moreData != RequestTypes.NONE:
            more = self.client.receiverReady(reply)
            if isinstance(more, list):
                for message in more:
                    self.exchange(message, reply)
            else:
                self.exchange(more, reply)
        return reply

    # --- association -------------------------------------------------------------------

    def associate(self):
        """SNRM/UA (HDLC), AARQ/AARE, and HLS passes 3/4 when the AARE asks for them."""
        if self.args.transport == "hdlc":
            reply = self.request(self.client.snrmRequest())
            self.client.parseUAResponse(reply.data)
        reply = self.request(self.client.aarqRequest())
        aare = aare_summary(reply.data.array())
        self.aare = aare
        self.client.parseAareResponse(reply.data)
        hls = self.args.auth == "hls-gmac"
        required = self.client.getIsAuthenticationRequired()
        aare["authentication_required"] = bool(required)
        if hls and not required:
            # IEC 62056-5-3 / Green Book, HLS pass 2: a server accepting an HLS AARQ
            # answers result = accepted with result-source-diagnostic acse-service-user
            # authentication-required (14); that is what tells a client to run passes 3
            # and 4. Gurux relies on it, as the standard lets it.
            raise Failure(
                EXIT_DLMS,
                "non-standard AARE for HLS-GMAC: result-source-diagnostic is {} instead of "
                "acse-service-user authentication-required (14), so a standard client skips HLS "
                "passes 3/4 and every request is refused (AARE {})".format(
                    " ".join("{} {}".format(k, v) for k, v in (aare.get("source_diagnostic") or {}).items())
                    or "absent",
                    aare.get("hex"),
                ),
            )
        if required:
            # HLS pass 3/4: reply_to_HLS_authentication on the association object.
            reply = self.request(self.client.getApplicationAssociationRequest())
            self.client.parseApplicationAssociationResponse(reply.data)

    def release(self):
        """RLRQ/RLRE, then DISC/UA on HDLC. Returns None, or what went wrong."""
        try:
            self.request(self.client.releaseRequest())
            if self.args.transport == "hdlc":
                self.request(self.client.disconnectRequest())
        except Exception as exc:  # reported, not fatal: everything was read by now
            return "{}: {}".format(type(exc).__name__, exc)
        return None

    # --- services ----------------------------------------------------------------------

    def read(self, obj, attribute):
        reply = self.request(self.client.read(obj, attribute))
        raw = reply.value
        value = self.client.updateValue(obj, attribute, reply.value)
        return raw, value

    def action(self, request):
        self.request(request)


def aare_summary(data):
    """Result and result-source-diagnostic of an AARE, read with a minimal BER walk, so a
    deviation can be reported in bytes whatever Gurux makes of it."""
    data = bytes(data)
    out = {"hex": hexs(data), "result": None, "source_diagnostic": None}
    if len(data) < 2 or data[0] != 0x61:
        return out
    pos, end = 2, min(len(data), 2 + data[1])
    while pos + 2 <= end:
        tag, length = data[pos], data[pos + 1]
        body = data[pos + 2 : pos + 2 + length]
        if tag == 0xA2 and len(body) == 3 and body[0] == 0x02:
            out["result"] = body[2]
        elif tag == 0xA3 and len(body) == 5 and body[2] == 0x02:
            kind = {0xA1: "acse-service-user", 0xA2: "acse-service-provider"}.get(body[0], hex(body[0]))
            out["source_diagnostic"] = {kind: body[4]}
        pos += 2 + length
    return out


def dt_json(value):
    """A Gurux date-time as JSON: ISO text, Unix seconds (when it is a point in time)."""
    if isinstance(value, GXDateTime):
        value = value.value
    if not isinstance(value, datetime.datetime):
        return {"text": str(value)}
    out = {"iso": value.isoformat()}
    if value.tzinfo is not None:
        out["unix"] = value.timestamp()
        out["utc_offset_minutes"] = int(value.utcoffset().total_seconds() // 60)
    return out


def run(args, result):
    """Do everything, filling `result` as it goes (so a failure still reports what was read)."""
    result.update(
        {
            "transport": args.transport,
            "client_sap": args.client,
            "auth": args.auth,
            "logical": args.logical,
            "physical": args.physical if args.transport == "hdlc" else None,
            "gurux_version": gurux_version(),
        }
    )
    s = Session(args)
    s.connect()
    try:
        s.associate()
        result["negotiated"] = {
            "max_pdu_size": s.client.maxReceivePDUSize,
            "conformance": int(s.client.negotiatedConformance),
            "server_system_title": hexs(s.client.sourceSystemTitle) if s.client.sourceSystemTitle else None,
        }

        ldn = GXDLMSData(LDN)
        raw, _ = s.read(ldn, 2)
        result["logical_device_name"] = bytes(raw).decode("ascii", "replace") if raw is not None else None
        result["logical_device_name_hex"] = hexs(raw) if raw is not None else None

        clock = GXDLMSClock(CLOCK)
        raw, value = s.read(clock, 2)
        entry = dt_json(value)
        entry["raw_hex"] = hexs(raw) if isinstance(raw, (bytes, bytearray)) else None
        result["clock"] = entry

        registers = {}
        reg_objects = {}
        for ln in (IMPORT, EXPORT):
            reg = GXDLMSRegister(ln)
            raw_su, _ = s.read(reg, 3)
            raw_value, _ = s.read(reg, 2)
            reg_objects[ln] = reg
            # Gurux keeps the scaler as a factor (10 ** scaler).
            registers[ln] = {
                "raw": raw_value,
                "scaler_unit_raw": [int(x) for x in raw_su] if raw_su is not None else None,
                "scaler": reg.scaler,
                "unit": int(reg.unit),
                "value": reg.value,
            }
        result["registers"] = registers

        if args.profile_from and args.profile_to:
            pg = GXDLMSProfileGeneric(LOAD_PROFILE)
            s.read(pg, 3)
            s.read(pg, 4)
            # Capture objects that are registers read above: reuse their scalers.
            columns = []
            for i, (obj, attr) in enumerate(pg.captureObjects):
                if obj.logicalName in reg_objects:
                    pg.captureObjects[i] = (reg_objects[obj.logicalName], attr)
                columns.append(
                    {
                        "class_id": int(obj.objectType),
                        "logical_name": obj.logicalName,
                        "attribute": attr.attributeIndex,
                        "data_index": attr.dataIndex,
                    }
                )
            start = datetime.datetime.fromisoformat(args.profile_from)
            end = datetime.datetime.fromisoformat(args.profile_to)
            reply = s.request(s.client.readRowsByRange(pg, start, end))
            s.client.updateValue(pg, 2, reply.value)
            rows = []
            for row in pg.buffer:
                cells = []
                for cell in row:
                    if isinstance(cell, GXDateTime):
                        cells.append(dt_json(cell))
                    elif isinstance(cell, (bytes, bytearray)):
                        cells.append({"hex": hexs(cell)})
                    else:
                        cells.append(cell)
                rows.append(cells)
            result["profile"] = {
                "from": args.profile_from,
                "to": args.profile_to,
                "capture_period": pg.capturePeriod,
                "columns": columns,
                "rows": rows,
            }

        dc = GXDisconnect()
        relay = {"mode": None, "states": []}
        out_state, ctl_state, mode = dc.read_all(s)
        relay["mode"] = mode
        relay["states"].append({"after": "start", "output_state": out_state, "control_state": ctl_state})
        for action in args.switch:
            if action == "disconnect":
                s.action(dc.obj.remoteDisconnect(s.client))
            else:
                s.action(dc.obj.remoteReconnect(s.client))
            out_state, ctl_state, _ = dc.read_all(s, with_mode=False)
            relay["states"].append({"after": action, "output_state": out_state, "control_state": ctl_state})
        result["relay"] = relay

        result["release_error"] = s.release()
    finally:
        s.close()
        result["aare"] = s.aare
        result["exchanges"] = s.exchanges
        if args.auth == "hls-gmac":
            # Where a next run must start: the meter refuses counters it has seen.
            result["invocation_counter_next"] = s.client.ciphering.invocationCounter


class GXDisconnect:
    """The disconnect control object and its read-back."""

    def __init__(self):
        self.obj = GXDLMSDisconnectControl(DISCONNECT_CONTROL)

    def read_all(self, s, with_mode=True):
        _, out_state = s.read(self.obj, 2)
        _, ctl_state = s.read(self.obj, 3)
        mode = None
        if with_mode:
            _, mode = s.read(self.obj, 4)
            mode = int(mode)
        return bool(out_state), int(ctl_state), mode


def gurux_version():
    try:
        from importlib import metadata

        return metadata.version("gurux-dlms")
    except Exception:
        return None


def hex_bytes(n):
    def parse(text):
        try:
            value = bytes.fromhex(text)
        except ValueError:
            raise argparse.ArgumentTypeError("not hex: {!r}".format(text))
        if len(value) != n:
            raise argparse.ArgumentTypeError("expected {} bytes ({} hex digits)".format(n, 2 * n))
        return value

    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--transport", choices=("wrapper", "hdlc"), required=True)
    p.add_argument("--logical", type=int, default=1, help="logical device: wrapper wPort / HDLC upper address")
    p.add_argument("--physical", type=int, default=16, help="HDLC lower (physical) address")
    p.add_argument("--client", type=int, default=16, help="client SAP (16 public, 1 management)")
    p.add_argument("--auth", choices=("none", "lls", "hls-gmac"), default="none")
    p.add_argument("--password", default=None, help="LLS password (ASCII)")
    p.add_argument("--guek", type=hex_bytes(16), help="HLS: global unicast encryption key, hex")
    p.add_argument("--gak", type=hex_bytes(16), help="HLS: authentication key, hex")
    p.add_argument("--system-title", type=hex_bytes(8), default=b"GRX\x00\x00\x00\x00\x01", help="client title, hex")
    p.add_argument("--invocation-counter", type=int, default=1)
    p.add_argument("--profile-from", help="ISO-8601 with offset, e.g. 2024-06-01T08:00:00+01:00")
    p.add_argument("--profile-to", help="ISO-8601 with offset")
    p.add_argument(
        "--switch",
        default="",
        help="comma-separated relay actions: disconnect, reconnect (empty: do not switch)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per answer")
    p.add_argument("--trace", action="store_true", help="hex of every frame on stderr")
    args = p.parse_args(argv)
    args.switch = [a for a in args.switch.split(",") if a]
    for a in args.switch:
        if a not in ("disconnect", "reconnect"):
            p.error("--switch: unknown action {!r}".format(a))
    if args.auth == "lls" and not args.password:
        p.error("--auth lls needs --password")
    if args.auth == "hls-gmac" and (args.guek is None or args.gak is None):
        p.error("--auth hls-gmac needs --guek and --gak")
    if bool(args.profile_from) != bool(args.profile_to):
        p.error("--profile-from and --profile-to go together")
    for text in (args.profile_from, args.profile_to):
        if text:
            try:
                parsed = datetime.datetime.fromisoformat(text)
            except ValueError:
                p.error("not an ISO-8601 date-time: {!r}".format(text))
            if parsed.tzinfo is None:
                p.error("give the profile range with a UTC offset: {!r}".format(text))
    return args


class GuruxPrints:
    """Where Gurux's print() calls end up: stderr, line by line, chatter filtered."""

    CHATTER = ("Encryption is applied.", "Authentication is applied.")

    def __init__(self, sink, keep_chatter):
        self.sink = sink
        self.keep_chatter = keep_chatter
        self.line = ""

    def write(self, text):
        self.line += text
        while "\n" in self.line:
            line, self.line = self.line.split("\n", 1)
            if self.keep_chatter or line.strip() not in self.CHATTER:
                self.sink.write(line + "\n")
        return len(text)

    def flush(self):
        self.sink.flush()


def main(argv):
    args = parse_args(argv)
    # Gurux quirk: it print()s to stdout, e.g. "Encryption is applied." for every ciphered
    # APDU, and "Invalid StoC" when HLS fails. Stdout must carry exactly one JSON object,
    # so its prints go to stderr, minus the per-APDU chatter unless --trace.
    out = sys.stdout
    sys.stdout = GuruxPrints(sys.stderr, keep_chatter=args.trace)
    result = {}
    try:
        run(args, result)
    except Failure as exc:
        return fail(out, exc.code, str(exc), args, result)
    except GXDLMSException as exc:
        return fail(out, EXIT_DLMS, "DLMS error from the meter: {}".format(exc), args, result)
    except Exception as exc:  # Gurux raises plain exceptions (ValueError, Exception) too
        return fail(out, EXIT_DLMS, "{}: {}".format(type(exc).__name__, exc), args, result)
    finally:
        sys.stdout = out
    out.write(json.dumps(result, default=str) + "\n")
    return 0


def fail(out, code, message, args, partial):
    """Explain on stderr; on stdout, the error and whatever was read before it."""
    where = "{} {}:{}".format(args.transport, args.host, args.port)
    sys.stderr.write("gurux_client.py: {} ({}, client {}, auth {})\n".format(message, where, args.client, args.auth))
    out.write(json.dumps({"error": message, "exit_code": code, "partial": partial}, default=str) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
