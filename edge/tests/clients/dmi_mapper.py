"""A mapper as KubeEdge's mapper-framework builds them, for kedge's DMI tests: it serves
DeviceMapperService on its own unix socket, registers with edgecore's DeviceManagerService and
reports twins and states. Stubs are generated from kedge's edge/proto with grpcio-tools.

Usage: dmi_mapper.py EDGECORE_SOCKET MAPPER_SOCKET NAME PROTOCOL LOG [--hang]

Commands come on stdin, one JSON object a line; each gets one JSON line on stdout:
  {"op": "register", "with_data": true}  -> {"ok": true, "devices": [...], "models": [...]}
  {"op": "status", "device": D, "namespace": NS, "twins": {PROPERTY: VALUE}}
  {"op": "status_raw"}                    (a report without reportedDevice)
  {"op": "state", "device": D, "namespace": NS, "state": S}
  -> {"ok": true} or {"ok": false, "code": "INVALID_ARGUMENT", "details": "..."}
Every call edgecore makes is appended to LOG as a JSON line {"method": M, ...}. With --hang,
every such call blocks (a mapper that hangs).
"""

import json
import os
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc
from grpc_tools import protoc

try:
    from importlib.resources import files as _files

    WELL_KNOWN = str(_files("grpc_tools") / "_proto")
except Exception:  # older Pythons
    import pkg_resources

    WELL_KNOWN = pkg_resources.resource_filename("grpc_tools", "_proto")

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto")


def generate():
    out = tempfile.mkdtemp(prefix="kedge-dmi-stubs-")
    code = protoc.main(
        [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{WELL_KNOWN}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(PROTO_ROOT, "dmi", "v1beta1", "api.proto"),
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed: {code}")
    sys.path.insert(0, out)
    from dmi.v1beta1 import api_pb2, api_pb2_grpc  # noqa: E402

    return api_pb2, api_pb2_grpc


def main():
    edgecore, own, name, protocol, log = sys.argv[1:6]
    hang = "--hang" in sys.argv[6:]
    api_pb2, api_pb2_grpc = generate()
    lock = threading.Lock()

    def record(method, **fields):
        if hang:
            time.sleep(3600)
        with lock, open(log, "a") as f:
            f.write(json.dumps({"method": method, **fields}) + "\n")

    def device_fields(device):
        desired = {
            p.name: p.desired.value for p in device.spec.properties if p.HasField("desired")
        }
        config = {}
        if device.spec.HasField("protocol") and device.spec.protocol.HasField("configData"):
            for key, value in device.spec.protocol.configData.data.items():
                config[key] = value.type_url
        return {
            "device": device.name,
            "namespace": device.namespace,
            "model": device.spec.deviceModelReference,
            "desired": desired,
            "config_types": config,
            "report_cycle": {p.name: p.reportCycle for p in device.spec.properties},
        }

    class Mapper(api_pb2_grpc.DeviceMapperServiceServicer):
        def RegisterDevice(self, request, context):
            record("RegisterDevice", **device_fields(request.device))
            return api_pb2.RegisterDeviceResponse(
                deviceName=request.device.name, deviceNamespace=request.device.namespace
            )

        def UpdateDevice(self, request, context):
            record("UpdateDevice", **device_fields(request.device))
            return api_pb2.UpdateDeviceResponse()

        def RemoveDevice(self, request, context):
            record("RemoveDevice", device=request.deviceName, namespace=request.deviceNamespace)
            return api_pb2.RemoveDeviceResponse()

        def CreateDeviceModel(self, request, context):
            record("CreateDeviceModel", model=request.model.name, namespace=request.model.namespace)
            return api_pb2.CreateDeviceModelResponse(
                deviceModelName=request.model.name, deviceModelNamespace=request.model.namespace
            )

        def UpdateDeviceModel(self, request, context):
            record("UpdateDeviceModel", model=request.model.name, namespace=request.model.namespace)
            return api_pb2.UpdateDeviceModelResponse()

        def RemoveDeviceModel(self, request, context):
            record("RemoveDeviceModel", model=request.modelName, namespace=request.modelNamespace)
            return api_pb2.RemoveDeviceModelResponse()

        def GetDevice(self, request, context):
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test mapper")

    if os.path.exists(own):
        os.unlink(own)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    api_pb2_grpc.add_DeviceMapperServiceServicer_to_server(Mapper(), server)
    server.add_insecure_port(f"unix://{own}")
    server.start()

    # grpc-python sends the socket path as :authority, which is not an RFC 3986 authority and
    # which Rust's HTTP/2 (h2, under tonic) refuses with PROTOCOL_ERROR; grpc-go, which the
    # mapper-framework uses, sends "localhost". Do as grpc-go does.
    channel = grpc.insecure_channel(
        f"unix://{edgecore}", options=[("grpc.default_authority", "localhost")]
    )
    manager = api_pb2_grpc.DeviceManagerServiceStub(channel)

    def answer(call):
        try:
            return {"ok": True, "reply": call()}
        except grpc.RpcError as e:
            return {"ok": False, "code": e.code().name, "details": e.details()}

    print(json.dumps({"ok": True, "ready": True}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        command = json.loads(line)
        op = command["op"]
        if op == "register":
            def call():
                reply = manager.MapperRegister(
                    api_pb2.MapperRegisterRequest(
                        withData=command.get("with_data", True),
                        mapper=api_pb2.MapperInfo(
                            name=name,
                            version="v1.0.0",
                            api_version="v1beta1",
                            protocol=protocol,
                            address=own.encode(),
                            state="running",
                        ),
                    ),
                    timeout=20,
                )
                return {
                    "devices": sorted(d.name for d in reply.deviceList),
                    "models": sorted(m.name for m in reply.modelList),
                }
            out = answer(call)
        elif op == "status":
            def call():
                twins = [
                    api_pb2.Twin(
                        propertyName=prop,
                        reported=api_pb2.TwinProperty(
                            value=value,
                            metadata={"timestamp": str(int(time.time() * 1000)), "type": "string"},
                        ),
                    )
                    for prop, value in command["twins"].items()
                ]
                manager.ReportDeviceStatus(
                    api_pb2.ReportDeviceStatusRequest(
                        deviceName=command["device"],
                        deviceNamespace=command.get("namespace", "default"),
                        reportedDevice=api_pb2.DeviceStatus(twins=twins),
                    ),
                    timeout=20,
                )
                return {}
            out = answer(call)
        elif op == "status_raw":
            out = answer(
                lambda: manager.ReportDeviceStatus(
                    api_pb2.ReportDeviceStatusRequest(deviceName="thermo-1"), timeout=20
                )
                and {}
            )
        elif op == "state":
            out = answer(
                lambda: manager.ReportDeviceStates(
                    api_pb2.ReportDeviceStatesRequest(
                        deviceName=command["device"],
                        deviceNamespace=command.get("namespace", "default"),
                        state=command["state"],
                    ),
                    timeout=20,
                )
                and {}
            )
        elif op == "quit":
            break
        else:
            out = {"ok": False, "code": "UNKNOWN_OP", "details": op}
        print(json.dumps(out), flush=True)
    # Standard input closed (the test ended): go at once, hung handlers or not.
    server.stop(0)
    os._exit(0)


if __name__ == "__main__":
    main()
