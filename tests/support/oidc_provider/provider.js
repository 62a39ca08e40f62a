// A real OpenID Connect provider for the worklist's tests: panva's oidc-provider (OpenID Certified), with our own
// minimal login page instead of its devInteractions (which accept any account id without a password and whose
// pages load web fonts from the internet: the browser tests allow loopback traffic only).
//
// Usage: node provider.js CONFIG.json [PORT]
// Listens on 127.0.0.1 (PORT, or a free one when 0 or absent) and prints one JSON line on stdout once it accepts
// connections: {"issuer": "http://127.0.0.1:PORT"}. tests/support/oidc.py reads it. Test use only.
import { randomBytes, generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';

import Provider from 'oidc-provider';

const [configPath, portArg] = process.argv.slice(2);
if (!configPath) {
  process.stderr.write('usage: node provider.js CONFIG.json [PORT]\n');
  process.exit(2);
}
const config = JSON.parse(readFileSync(configPath, 'utf8'));
const accounts = config.accounts ?? {};

const escapeHtml = (value) => String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(title, body) {
  // Self-contained: no external stylesheet, font or script.
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>${escapeHtml(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><main><h1>${escapeHtml(title)}</h1>${body}</main></body></html>`;
}

function loginPage(uid, clientName, error) {
  const alert = error ? `<p role="alert" id="login-error">${escapeHtml(error)}</p>` : '';
  return page('Test identity provider: sign in', `
<p>Signing in to ${escapeHtml(clientName)}.</p>${alert}
<form id="login-form" method="post" action="/interaction/${escapeHtml(uid)}/login" autocomplete="off">
<p><label for="login">User name</label> <input id="login" name="login" required autofocus></p>
<p><label for="password">Password</label> <input id="password" name="password" type="password" required></p>
<p><button id="login-submit" type="submit">Sign in</button></p>
</form>
<p><a id="login-abort" href="/interaction/${escapeHtml(uid)}/abort">Cancel</a></p>`);
}

// Signing keys made at start: a fresh provider per test session, nothing to keep secret on disk.
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: randomBytes(8).toString('hex'), use: 'sig', alg: 'RS256' };

const server = http.createServer();
server.listen(Number(portArg ?? 0), '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients: config.clients,
    jwks: { keys: [jwk] },
    cookies: { keys: [randomBytes(32).toString('hex')] },
    // Every scope's claims also go into the ID token (not only the userinfo endpoint), so a relying party may
    // read the roles from either; the `openid` scope carries them, so no extra scope has to be asked for.
    conformIdTokenClaims: false,
    claims: {
      openid: ['sub', 'roles'],
      profile: ['name', 'preferred_username'],
      email: ['email', 'email_verified'],
      roles: ['roles'],
    },
    scopes: ['openid', 'offline_access', 'profile', 'email', 'roles'],
    pkce: { required: () => true }, // OAuth 2.0 Security BCP (RFC 9700 §2.1.1): PKCE for every client
    features: {
      devInteractions: { enabled: false },
      rpInitiatedLogout: {
        enabled: true,
        logoutSource: async (ctx, form) => {
          ctx.body = page('Sign out', `${form}<button id="logout-yes" type="submit" form="op.logoutForm" value="yes"
name="logout">Yes, sign me out</button> <button type="submit" form="op.logoutForm">No</button>`);
        },
        postLogoutSuccessSource: async (ctx) => { ctx.body = page('Signed out', '<p>You are signed out.</p>'); },
      },
    },
    renderError: async (ctx, out) => {
      ctx.type = 'html';
      ctx.body = page('Sign-in error', Object.entries(out).map(([k, v]) => `<p><strong>${escapeHtml(k)}</strong>:
 <span class="${escapeHtml(k)}">${escapeHtml(v)}</span></p>`).join(''));
    },
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    // The test clients are first party: consent is implied (oidc-provider's documented "skip consent" recipe),
    // so a login is one form.
    loadExistingGrant: async (ctx) => {
      const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
      if (grantId) return ctx.oidc.provider.Grant.find(grantId);
      const grant = new ctx.oidc.provider.Grant({
        clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId,
      });
      grant.addOIDCScope([...ctx.oidc.requestParamOIDCScopes].join(' '));
      await grant.save();
      return grant;
    },
    findAccount: async (ctx, id) => {
      const account = Object.hasOwn(accounts, id) ? accounts[id] : undefined;
      if (!account) return undefined;
      return {
        accountId: id,
        claims: async () => ({
          sub: id,
          preferred_username: id,
          name: account.name,
          email: account.email,
          email_verified: true,
          roles: account.roles ?? [],
        }),
      };
    },
  });
  provider.on('server_error', (ctx, err) => process.stderr.write(`server_error: ${err.stack}\n`));

  const providerHandler = provider.callback();
  const readForm = (req) => new Promise((resolve, reject) => {
    let raw = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => {
      raw += chunk;
      if (raw.length > 10000) reject(new Error('form too large'));
    });
    req.on('end', () => resolve(new URLSearchParams(raw)));
    req.on('error', reject);
  });
  const send = (res, status, html) => {
    res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
    res.end(html);
  };

  async function interaction(req, res, uid, action) {
    const details = await provider.interactionDetails(req, res);
    if (details.uid !== uid) return send(res, 400, page('Sign-in error', '<p>Unknown interaction.</p>'));
    const client = await provider.Client.find(details.params.client_id);
    const clientName = client?.clientName ?? details.params.client_id;
    if (action === 'abort') {
      return provider.interactionFinished(req, res, {
        error: 'access_denied', error_description: 'End-User aborted interaction',
      }, { mergeWithLastSubmission: false });
    }
    if (details.prompt.name !== 'login') {
      // loadExistingGrant makes consent implicit; any other prompt is a configuration error of this test OP.
      return send(res, 501, page('Sign-in error', `<p>Unsupported prompt ${escapeHtml(details.prompt.name)}.</p>`));
    }
    if (req.method === 'GET' && !action) return send(res, 200, loginPage(uid, clientName));
    if (req.method === 'POST' && action === 'login') {
      const form = await readForm(req);
      const login = form.get('login') ?? '';
      const account = Object.hasOwn(accounts, login) ? accounts[login] : undefined;
      if (!account || account.password !== (form.get('password') ?? '')) {
        return send(res, 401, loginPage(uid, clientName, 'Unknown user name or wrong password.'));
      }
      return provider.interactionFinished(req, res, { login: { accountId: login } },
        { mergeWithLastSubmission: false });
    }
    return send(res, 405, page('Sign-in error', '<p>Method not allowed.</p>'));
  }

  server.on('request', (req, res) => {
    const match = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|abort))?$/.exec(new URL(req.url, issuer).pathname);
    if (!match) return providerHandler(req, res);
    return interaction(req, res, match[1], match[2]).catch((err) => {
      // SessionNotFound and the like: the interaction cookie is missing or expired.
      send(res, err.statusCode ?? 500, page('Sign-in error', `<p>${escapeHtml(err.error_description ?? err.message)}</p>`));
    });
  });
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0)); // nothing to flush: all state is in memory
}
