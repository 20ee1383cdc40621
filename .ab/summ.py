import json, glob, os, sys
for path in sorted(glob.glob(os.environ["OUT"] + "/*decode-configs*.json")):
    for r in json.load(open(path))["rows"]:
        top = sorted(r["configs"].items(), key=lambda kv: kv[1])[:5]
        print(r["batch"], r["context"], "default %.2f" % r["default_us"], " ".join(f"{k}={v:.2f}" for k, v in top))
