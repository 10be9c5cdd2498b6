#!/usr/bin/env node
// node clients/node/recognize.js [--address HOST:PORT] [--ca CA.pem [--cert C.pem --key K.pem]] IMAGE_OR_FOLDER...
//
// The Node.js twin of `python -m client`: @grpc/grpc-js with the contracts
// loaded from protos/ at run time by @grpc/proto-loader (nothing generated).
// Prints one JSON object per image with the python client's field names and
// formatting; a failed image prints {"image", "error": {"code", "message"}} and
// the command exits 1 after the others are done.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const IMAGE_SUFFIXES = new Set(['.jpg', '.jpeg', '.png']);
const MAX_MESSAGE = 64 << 20;

const USAGE = `usage: node clients/node/recognize.js [--address HOST:PORT] [--top-k N] [--skip-logo]
       [--model NAME] [--box X_MIN,Y_MIN,X_MAX,Y_MAX] [--skip-localization] [--timeout SECONDS]
       [--ca CA.pem] [--cert CERT.pem] [--key KEY.pem] IMAGE_OR_FOLDER...`;
// One number of --box, as every client reads it: plain decimal, optional sign and exponent.
const NUMBER = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;

function usageError(message) {
  process.stderr.write(`${USAGE}\nrecognize.js: error: ${message}\n`);
  process.exit(2);
}

// --box x_min,y_min,x_max,y_max: four finite numbers (their range is the router's to check).
function parseBox(text) {
  const parts = text.split(',').map((part) => part.replace(/^ +| +$/g, ''));
  const values = parts.filter((part) => NUMBER.test(part)).map(Number);
  if (parts.length !== 4 || values.length !== 4 || !values.every(Number.isFinite)) {
    usageError('argument --box: expected x_min,y_min,x_max,y_max (four numbers, fractions of the width and height), '
               + `got ${JSON.stringify(text)}`);
  }
  const [x_min, y_min, x_max, y_max] = values;
  return { x_min, y_min, x_max, y_max };
}

function parseArgs(argv) {
  const env = process.env;
  const args = {
    address: env.ROUTER_ADDRESS || 'localhost:50050', topK: 5, skipLogo: false, model: '', timeout: 30,
    box: null, skipLocalization: false,
    ca: env.ROUTER_TLS_CA || '', cert: env.ROUTER_TLS_CLIENT_CERT || '', key: env.ROUTER_TLS_CLIENT_KEY || '',
    images: [],
  };
  const valued = { '--address': 'address', '--top-k': 'topK', '--model': 'model', '--timeout': 'timeout',
                   '--ca': 'ca', '--cert': 'cert', '--key': 'key', '--box': 'box' };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let value;
    if (arg.startsWith('--') && arg.includes('=')) [arg, value] = [arg.slice(0, arg.indexOf('=')), arg.slice(arg.indexOf('=') + 1)];
    if (arg === '-h' || arg === '--help') { process.stdout.write(`${USAGE}\n`); process.exit(0); }
    if (arg === '--skip-logo') { args.skipLogo = true; continue; }
    if (arg === '--skip-localization') { args.skipLocalization = true; continue; }
    if (arg in valued) {
      if (value === undefined) {
        if (i + 1 >= argv.length) usageError(`argument ${arg}: expected one argument`);
        value = argv[++i];
      }
      args[valued[arg]] = value;
      continue;
    }
    if (arg.startsWith('--')) usageError(`unrecognized arguments: ${arg}`);
    args.images.push(argv[i]);
  }
  args.topK = Number.parseInt(args.topK, 10);
  args.timeout = Number.parseFloat(args.timeout);
  if (Number.isNaN(args.topK) || Number.isNaN(args.timeout)) usageError('--top-k and --timeout take numbers');
  if (args.box !== null) args.box = parseBox(args.box);
  if (!args.images.length) usageError('the following arguments are required: images');
  return args;
}

// Files as given; folders expand to their JPEG/PNG files, sorted per path component (as python's sorted(Path)).
// Paths read as pathlib prints them: no empty or "." components ("./a//b.jpg" -> "a/b.jpg").
function clean(raw) {
  const parts = raw.split('/').filter((part, i) => part !== '.' && (part !== '' || i === 0));
  return parts.join('/') || '.';
}

function expand(paths) {
  const found = [];
  const walk = (dir) => {
    for (const name of fs.readdirSync(dir).sort()) {
      const full = dir === '.' ? name : `${dir}/${name}`;
      let stat;
      try { stat = fs.statSync(full); } catch { continue; }
      if (stat.isDirectory()) walk(full);
      else if (IMAGE_SUFFIXES.has(path.extname(name).toLowerCase())) found.push(full);
    }
  };
  for (const raw of paths) {
    let isDir = false;
    try { isDir = fs.statSync(raw).isDirectory(); } catch { /* a missing file fails later, per image */ }
    if (isDir) walk(clean(raw));
    else found.push(clean(raw));
  }
  return found;
}

// round(x, digits) as python prints it: the exact value rounded half to even (toFixed rounds
// exact ties away from zero), shortest form, at least one decimal.
class PyFloat {
  constructor(x, digits) {
    let text = Number(x).toFixed(digits);
    const exact = Number(x).toFixed(100).replace(/0+$/, '');
    if (exact.length - exact.indexOf('.') - 1 === digits + 1 && exact.endsWith('5')) {
      const down = exact.slice(0, -1); // an exact tie: keep the even neighbour
      if (Number(down[down.length - 1]) % 2 === 0) text = down;
    }
    text = text.replace(/0+$/, '');
    this.text = text.endsWith('.') ? `${text}0` : text;
  }
}
const round = (x, digits) => new PyFloat(x, digits);

// JSON written as python's json.dumps writes it: ", " and ": " separators, ASCII only.
function dumps(value) {
  if (value === null || value === undefined) return 'null';
  if (value instanceof PyFloat) return value.text;
  if (typeof value === 'string') {
    return JSON.stringify(value).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  }
  if (typeof value !== 'object') return String(value);
  if (Array.isArray(value)) return `[${value.map(dumps).join(', ')}]`;
  const entries = value instanceof Map ? [...value] : Object.entries(value);
  return `{${entries.map(([k, v]) => `${dumps(k)}: ${dumps(v)}`).join(', ')}}`;
}

function toJson(image, r) {
  const box = r.box || { x_min: 0, y_min: 0, x_max: 0, y_max: 0 };
  return {
    image,
    make: r.make,
    model: r.model,
    year: r.year,
    label: r.label,
    confidence: round(r.confidence, 4),
    make_confidence: round(r.make_confidence, 4),
    route: String(r.route).replace(/^ROUTE_/, '').toLowerCase(),
    route_detail: r.route_detail,
    box: {
      x_min: round(box.x_min, 4), y_min: round(box.y_min, 4), x_max: round(box.x_max, 4), y_max: round(box.y_max, 4),
      score: round(r.box_score, 4),
    },
    cars_found: r.cars_found,
    framing: String(r.framing).replace(/^FRAMING_/, '').toLowerCase(),
    verdict: String(r.verdict).replace(/^VERDICT_/, '').toLowerCase(),
    verdict_score: round(r.verdict_score, 4),
    verdict_threshold: round(r.verdict_threshold, 4),
    model_name: r.model_name,
    model_version: Number(r.model_version),
    logo: r.logo && r.logo.brand ? { brand: r.logo.brand, inliers: r.logo.inliers, matched: r.logo_matched } : null,
    top_k: r.top_k.map((p) => ({ label: p.label, confidence: round(p.confidence, 4) })),
    ms: new Map(r.timings.map((t) => [t.stage, round(t.ms, 1)])), // a dict: first place, last value
  };
}

function credentialsFor(args) {
  if (!args.ca) return grpc.credentials.createInsecure();
  return grpc.credentials.createSsl(
    fs.readFileSync(args.ca),
    args.key ? fs.readFileSync(args.key) : null,
    args.cert ? fs.readFileSync(args.cert) : null,
  );
}

function recognize(client, request, timeoutSeconds) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutSeconds * 1000);
    client.Recognize(request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const images = expand(args.images);
  if (!images.length) usageError('no JPEG or PNG files found in the given paths');

  const definition = protoLoader.loadSync('carrecog/v1/recognition_service.proto', {
    includeDirs: [PROTOS], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  });
  const v1 = grpc.loadPackageDefinition(definition).carrecog.v1;
  const client = new v1.RecognitionService(args.address, credentialsFor(args), {
    'grpc.max_send_message_length': MAX_MESSAGE, 'grpc.max_receive_message_length': MAX_MESSAGE,
  });

  let failures = 0;
  for (const image of images) {
    let line;
    let bytes;
    try {
      bytes = fs.readFileSync(image);
    } catch (err) {
      failures++;
      line = { image, error: { code: 'FILE_ERROR', message: err.message } };
    }
    if (bytes) {
      try {
        const request = {
          image: bytes,
          image_id: image,
          options: {
            top_k: args.topK, skip_logo: args.skipLogo, force_model: args.model, skip_localization: args.skipLocalization,
          },
        };
        if (args.box) request.car_box = args.box;
        line = toJson(image, await recognize(client, request, args.timeout));
      } catch (err) {
        failures++;
        const code = Object.keys(grpc.status).find((name) => grpc.status[name] === err.code) || 'UNKNOWN';
        line = { image, error: { code, message: err.details !== undefined ? err.details : err.message } };
      }
    }
    process.stdout.write(`${dumps(line)}\n`);
  }
  client.close();
  return failures ? 1 : 0;
}

main().then((code) => { process.exitCode = code; }, (err) => {
  process.stderr.write(`recognize.js: ${err.stack || err}\n`);
  process.exitCode = 1;
});
