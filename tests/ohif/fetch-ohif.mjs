// Fetch the prebuilt OHIF viewer (@ohif/app's dist/) pinned in package.json "ohifApp" into
// node_modules/.ohif/app-<version>/dist. Runs as `npm ci`'s postinstall; idempotent.
//
// Why not a normal dependency: only dist/ is used, and @ohif/app's own ~40 dependencies (webpack loaders,
// @ohif/* workspace packages) are neither needed to serve it nor all resolvable from the registry we reach
// (e.g. @ohif/i18n@3.13.2 is missing), so `npm install @ohif/app` fails. `npm pack` fetches the one tarball
// through the ordinary npm client; its sha512 is checked against the pinned integrity.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const { version, integrity } = JSON.parse(readFileSync(join(here, 'package.json'), 'utf8')).ohifApp;
const root = join(here, 'node_modules', '.ohif');
const target = join(root, `app-${version}`);
const marker = join(target, '.integrity');

if (existsSync(marker) && readFileSync(marker, 'utf8').trim() === integrity && existsSync(join(target, 'dist', 'index.html'))) {
  console.log(`@ohif/app@${version} dist already in ${target}`);
  process.exit(0);
}
const tmp = join(root, `tmp-${process.pid}`);
rmSync(tmp, { recursive: true, force: true });
mkdirSync(tmp, { recursive: true });
const npm = process.env.npm_execpath;
const [cmd, pre] = npm && npm.endsWith('.js') ? [process.execPath, [npm]] : ['npm', []];
const out = execFileSync(cmd, [...pre, 'pack', `@ohif/app@${version}`, '--pack-destination', tmp, '--json', '--silent'],
  { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
const tgz = join(tmp, JSON.parse(out)[0].filename.replace(/^@/, '').replace('/', '-'));
const got = 'sha512-' + createHash('sha512').update(readFileSync(tgz)).digest('base64');
if (got !== integrity) {
  rmSync(tmp, { recursive: true, force: true });
  throw new Error(`@ohif/app@${version}: integrity mismatch (${got} != pinned ${integrity})`);
}
execFileSync('tar', ['-xzf', tgz, '-C', tmp, 'package/dist', 'package/package.json', 'package/LICENSE'], { stdio: 'inherit' });
rmSync(target, { recursive: true, force: true });
renameSync(join(tmp, 'package'), target);
writeFileSync(marker, integrity + '\n');
rmSync(tmp, { recursive: true, force: true });
console.log(`@ohif/app@${version} dist -> ${target}`);
