// A real OpenID provider (npm `oidc-provider`) for Atelier's tests and local demo.
//
//   node provider.mjs --config config.json [--port 0] [--host 127.0.0.1]
//
// config.json: {"audience": "<API audience>", "clients": [<oidc-provider client metadata>],
//               "users": [{"id", "email", "password", "groups": [...], "name"?,
//                          "email_verified"? (default true)}]}
//
// - Logins go through our own interaction pages, which check the password (the library's
//   development login accepts anything). Consent is granted without asking: every client here
//   is first-party.
// - Access tokens for the API are JWTs (resourceIndicators): audience = config.audience, with
//   the user's `email`, `email_verified` and `groups` claims. A client that asks for no resource gets an opaque
//   token for userinfo, as the API's browser login does.
// - Signing keys are generated at start. Test-only endpoints (this is a test provider):
//     POST /__test/rotate  new signing key first, old keys still published
//     POST /__test/retire  publish only the current key
//     POST /__test/mint    {"claims": {...}, "mode": "sign"|"none"|"hmac"|"foreign", "kid"?,
//                           "header"?: {...} extra JOSE header fields such as crit}
//                          a token as an attacker or a broken issuer would make it
//     GET  /__test/keys    the published key ids
// Prints `READY <issuer>` once listening.

import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';
import { KeyObject, createHmac, randomBytes, sign as cryptoSign } from 'node:crypto';
import { parseArgs } from 'node:util';
import * as jose from 'jose';
import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    config: { type: 'string' },
    port: { type: 'string', default: process.env.OIDC_PORT || '0' },
    host: { type: 'string', default: '127.0.0.1' },
  },
});
if (!args.config) {
  console.error('usage: node provider.mjs --config config.json [--port N] [--host H]');
  process.exit(2);
}
const config = JSON.parse(readFileSync(args.config, 'utf8'));
const users = new Map(config.users.map((user) => [user.id, user]));
const byLogin = new Map(config.users.flatMap((user) => [[user.id, user], [user.email, user]]));
const cookieKeys = [randomBytes(32).toString('hex')];

/** Signing keys, current first. */
let keys = [await newKey()];
let provider;
let issuer;

async function newKey() {
  const { privateKey, publicKey } = await jose.generateKeyPair('RS256', { extractable: true });
  const kid = randomBytes(8).toString('hex');
  const jwk = { ...(await jose.exportJWK(privateKey)), kid, alg: 'RS256', use: 'sig' };
  const spki = await jose.exportSPKI(publicKey);
  return { kid, jwk, privateKey, spki };
}

const verified = (user) => user.email_verified ?? true;

function build() {
  const next = new Provider(issuer, {
    clients: config.clients,
    jwks: { keys: keys.map((key) => key.jwk) },
    cookies: { keys: cookieKeys },
    scopes: ['openid', 'email', 'profile', 'groups', 'atelier', 'offline_access'],
    claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'], groups: ['groups'] },
    pkce: { required: () => true },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
    findAccount: async (_ctx, id) => {
      const user = users.get(id);
      if (!user) return undefined;
      return {
        accountId: id,
        claims: async () => ({ sub: id, email: user.email, email_verified: verified(user), name: user.name || id, groups: user.groups }),
      };
    },
    extraTokenClaims: async (_ctx, token) => {
      const user = token.accountId && users.get(token.accountId);
      if (token.kind !== 'AccessToken' || !user) return undefined;
      // A user without groups gets no groups claim at all (the "missing groups" case).
      const email = { email: user.email, email_verified: verified(user) };
      return user.groups ? { ...email, groups: user.groups } : email;
    },
    features: {
      devInteractions: { enabled: false },
      rpInitiatedLogout: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => undefined,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, resource) => {
          if (resource !== config.audience) throw new errors.InvalidTarget();
          return { scope: 'atelier', audience: config.audience, accessTokenTTL: 600, accessTokenFormat: 'jwt', jwt: { sign: { alg: 'RS256' } } };
        },
      },
    },
    ttl: { AccessToken: 600, IdToken: 600, Interaction: 600, Session: 3600, Grant: 3600, AuthorizationCode: 60 },
  });
  next.proxy = false;
  return next;
}

// ---- interaction pages ----

const escape = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function loginPage(uid, client, error) {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in</title></head><body style="font-family:sans-serif;max-width:22rem;margin:3rem auto">
<h1>Sign in</h1><p>to ${escape(client)}</p>${error ? `<p role="alert" style="color:#b00">${escape(error)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}/login">
<p><label>E-mail or user id<br><input name="login" autocomplete="username" required autofocus></label></p>
<p><label>Password<br><input name="password" type="password" autocomplete="current-password" required></label></p>
<p><button type="submit">Sign in</button></p></form></body></html>`;
}

async function readForm(req) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 16384) throw new Error('form too large');
  }
  return new URLSearchParams(body);
}

async function readJson(req) {
  let body = '';
  for await (const chunk of req) body += chunk;
  return body ? JSON.parse(body) : {};
}

function send(res, status, type, body) {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(body);
}

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) return send(res, 400, 'text/plain', 'interaction mismatch');
  const { prompt, params, session } = details;
  if (prompt.name === 'login') {
    if (req.method === 'GET') return send(res, 200, 'text/html; charset=utf-8', loginPage(uid, params.client_id));
    if (req.method === 'POST' && action === 'login') {
      const form = await readForm(req);
      const user = byLogin.get(form.get('login') || '');
      if (!user || form.get('password') !== user.password) {
        return send(res, 401, 'text/html; charset=utf-8', loginPage(uid, params.client_id, 'Invalid e-mail or password.'));
      }
      return provider.interactionFinished(req, res, { login: { accountId: user.id } }, { mergeWithLastSubmission: false });
    }
  }
  if (prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
    if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(prompt.details.missingResourceScopes || {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    const consent = details.grantId ? {} : { grantId };
    return provider.interactionFinished(req, res, { consent }, { mergeWithLastSubmission: true });
  }
  return send(res, 400, 'text/plain', `unexpected prompt ${prompt.name}`);
}

// ---- test-only endpoints ----

const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');

async function mint({ claims = {}, mode = 'sign', kid, header = {} }) {
  const now = Math.floor(Date.now() / 1000);
  const payload = { iss: issuer, aud: config.audience, iat: now, exp: now + 300, ...claims };
  for (const [key, value] of Object.entries(payload)) if (value === null) delete payload[key];
  const current = keys[0];
  if (mode === 'none') return `${b64({ alg: 'none', kid: kid ?? current.kid })}.${b64(payload)}.`;
  if (mode === 'hmac') {
    // The classic confusion attack: HS256 keyed with the published public key.
    const signingInput = `${b64({ alg: 'HS256', typ: 'JWT', kid: kid ?? current.kid })}.${b64(payload)}`;
    const signature = createHmac('sha256', current.spki).update(signingInput).digest('base64url');
    return `${signingInput}.${signature}`;
  }
  const key = mode === 'foreign' ? await newKey() : current;
  const protectedHeader = { alg: 'RS256', typ: 'JWT', kid: kid ?? key.kid, ...header };
  // jose refuses to sign a `crit` it does not know; sign by hand then, as an attacker would.
  if (!protectedHeader.crit) return new jose.SignJWT(payload).setProtectedHeader(protectedHeader).sign(key.privateKey);
  const signingInput = `${b64(protectedHeader)}.${b64(payload)}`;
  const signature = cryptoSign('sha256', Buffer.from(signingInput), KeyObject.from(key.privateKey)).toString('base64url');
  return `${signingInput}.${signature}`;
}

async function test(req, res, path) {
  if (req.method === 'POST' && path === 'rotate') {
    keys = [await newKey(), ...keys];
    provider = build();
  } else if (req.method === 'POST' && path === 'retire') {
    keys = [keys[0]];
    provider = build();
  } else if (req.method === 'POST' && path === 'mint') {
    return send(res, 200, 'application/json', JSON.stringify({ token: await mint(await readJson(req)) }));
  } else if (!(req.method === 'GET' && path === 'keys')) {
    return send(res, 404, 'text/plain', 'not found');
  }
  return send(res, 200, 'application/json', JSON.stringify({ kids: keys.map((key) => key.kid) }));
}

const server = createServer(async (req, res) => {
  try {
    const url = new URL(req.url, issuer);
    const interactionMatch = url.pathname.match(/^\/interaction\/([^/]+)(?:\/(login))?$/);
    if (interactionMatch) return await interaction(req, res, interactionMatch[1], interactionMatch[2]);
    const testMatch = url.pathname.match(/^\/__test\/([a-z]+)$/);
    if (testMatch) return await test(req, res, testMatch[1]);
    return provider.callback()(req, res);
  } catch (error) {
    console.error(error);
    if (!res.headersSent) send(res, 500, 'text/plain', String(error.message || error));
  }
});

server.listen(Number(args.port), args.host, () => {
  const { port } = server.address();
  issuer = `http://${args.host}:${port}`;
  provider = build();
  provider.on('server_error', (_ctx, error) => console.error('server_error', error));
  console.log(`READY ${issuer}`);
});

for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => server.close(() => process.exit(0)));
