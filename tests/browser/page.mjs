// Clicks through Atelier's page in headless Chromium (Debian's package, never a downloaded
// browser): log in at the OpenID provider, generate, watch the progress, see the image, find
// it in "My images" and reuse its parameters; on a phone-sized screen.
//
//   node page.mjs --api URL --login alice@example.com --password alice-pw --prompt TEXT --out DIR
//                 [--admin-login L --admin-password P]
//
// With --admin-login, a tenant admin then opens the admin view on a desktop-sized screen.
//
// The job is driven to completion by whoever runs this (the controller and inference, or a
// test playing them); this script only looks at the page. Screenshots go to --out.
// Prints `PAGE OK` at the end; exits non-zero on the first failed expectation.

import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const { values: args } = parseArgs({
  options: {
    api: { type: 'string' },
    login: { type: 'string' },
    password: { type: 'string' },
    prompt: { type: 'string' },
    out: { type: 'string' },
    timeout: { type: 'string', default: '60000' },
    'admin-login': { type: 'string' },
    'admin-password': { type: 'string' },
  },
});
for (const name of ['api', 'login', 'password', 'prompt', 'out']) {
  if (!args[name]) throw new Error(`--${name} is required`);
}
mkdirSync(args.out, { recursive: true });
const timeout = Number(args.timeout);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
});
const step = async (name, fn) => {
  process.stdout.write(`- ${name}\n`);
  await fn();
};
try {
  // A phone-sized screen.
  const context = await browser.newContext({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
  const page = await context.newPage();
  page.setDefaultTimeout(timeout);
  const problems = [];
  page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  page.on('console', (message) => { if (message.type() === 'error') problems.push(`console: ${message.text()}`); });
  const shot = (name) => page.screenshot({ path: join(args.out, `${name}.png`), fullPage: true });

  await step('the page offers a login', async () => {
    await page.goto(args.api);
    await page.locator('#login').waitFor({ state: 'visible' });
    await shot('1-login');
  });

  await step('log in at the provider', async () => {
    await page.click('#login');
    await page.fill('input[name=login]', args.login);
    await page.fill('input[name=password]', args.password);
    await shot('2-provider-form');
    await page.click('button[type=submit]');
    await page.waitForURL(`${args.api}/`);
    await page.locator('#app-view').waitFor({ state: 'visible' });
    const user = await page.textContent('#user');
    if (user !== args.login) throw new Error(`logged in as ${user}`);
    await page.locator('#quota').filter({ hasText: 'images left today' }).waitFor();
    if (await page.locator('#admin-tab').isVisible()) throw new Error('a plain user sees the admin tab');
    await shot('3-logged-in');
  });

  await step('generate and watch the progress', async () => {
    await page.fill('#prompt', args.prompt);
    await page.selectOption('#size', '256x256');
    await page.fill('#steps', '4');
    await page.click('#submit');
    await page.locator('#job').waitFor({ state: 'visible' });
    await page.locator('#job-phase').filter({ hasText: /Pending|Queued|Running/ }).waitFor();
    await shot('4-submitted');
    await page.locator('#job-detail').filter({ hasText: /step \d+ of 4/ }).waitFor();
    await shot('5-progress');
    await page.locator('#job-phase').filter({ hasText: 'Succeeded' }).waitFor();
    const image = page.locator('#job-images img').first();
    await image.waitFor({ state: 'attached' });
    await page.waitForFunction(() => {
      const img = document.querySelector('#job-images img');
      return img && img.complete && img.naturalWidth > 0;
    });
    const progress = await page.$eval('#job-progress', (el) => [el.value, el.max]);
    if (progress[0] !== progress[1]) throw new Error(`progress bar at ${progress}`);
    await shot('6-done');
  });

  await step('find it in "My images" and reuse its parameters', async () => {
    await page.click('button[data-tab=gallery]');
    const card = page.locator('#gallery .card').first();
    await card.waitFor();
    await page.waitForFunction(() => [...document.querySelectorAll('#gallery img')].some((img) => img.complete && img.naturalWidth > 0));
    await shot('7-gallery');
    await card.locator('button', { hasText: 'Reuse parameters' }).click();
    await page.locator('#tab-generate').waitFor({ state: 'visible' });
    const prompt = await page.inputValue('#prompt');
    if (!prompt) throw new Error('reusing parameters left the prompt empty');
    await shot('8-reused');
  });

  await step('log out', async () => {
    await page.click('#logout button');
    // RP-initiated logout: the provider asks for confirmation, then sends the browser back.
    const confirm = page.locator('button[name=logout][value=yes]');
    await Promise.race([confirm.waitFor(), page.locator('#login').waitFor({ state: 'visible' })]);
    if (await confirm.isVisible()) {
      await shot('9-provider-logout');
      await confirm.click();
    }
    await page.waitForURL((url) => url.toString().startsWith(args.api));
    await page.locator('#login').waitFor({ state: 'visible' });
    await shot('10-logged-out');
  });

  if (args['admin-login']) {
    await step('an admin sees the tenant\'s queue and usage', async () => {
      const admin = await (await browser.newContext({ viewport: { width: 1280, height: 900 } })).newPage();
      admin.setDefaultTimeout(timeout);
      admin.on('pageerror', (error) => problems.push(`admin page error: ${error.message}`));
      await admin.goto(args.api);
      await admin.click('#login');
      await admin.fill('input[name=login]', args['admin-login']);
      await admin.fill('input[name=password]', args['admin-password']);
      await admin.click('button[type=submit]');
      await admin.locator('#admin-tab').waitFor({ state: 'visible' });
      await admin.click('#admin-tab');
      await admin.locator('#admin-summary p').filter({ hasText: 'replicas' }).waitFor();
      await admin.locator('#admin-queue tbody tr').first().waitFor();
      const usageHref = await admin.getAttribute('#admin-usage', 'href');
      if (!usageHref.includes('/usage?format=csv')) throw new Error(`usage link ${usageHref}`);
      await admin.screenshot({ path: join(args.out, '11-admin.png'), fullPage: true });
    });
  }

  const real = problems.filter((p) => !p.includes('Failed to load resource'));
  if (real.length) throw new Error(`the page reported errors:\n${real.join('\n')}`);
  console.log('PAGE OK');
} finally {
  await browser.close();
}
