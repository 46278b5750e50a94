// Token handling for gateway.conf (nginx njs): is the client's token the shared one, and what
// Authorization header does this pod's TorchServe expect. Both files are read on every request.
import fs from 'fs';

// A shorter shared token is refused outright, so a placeholder or empty Secret locks the gateway.
const MIN_TOKEN_LENGTH = 16;

function readText(path) {
    try {
        return fs.readFileSync(path, 'utf8').trim();
    } catch (e) {
        return '';
    }
}

// Every character is compared, so the time taken does not tell how much of a guess was right.
function sameText(a, b) {
    if (a.length !== b.length) {
        return false;
    }
    let diff = 0;
    for (let i = 0; i < a.length; i++) {
        diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
    }
    return diff === 0;
}

// "1" when the request carries "Authorization: Bearer <shared token>", else "0".
function clientAllowed(r) {
    const expected = readText(r.variables.client_token_file);
    const match = /^Bearer\s+(\S+)$/.exec(r.headersIn.Authorization || '');
    if (expected.length < MIN_TOKEN_LENGTH || match === null) {
        return '0';
    }
    return sameText(match[1], expected) ? '1' : '0';
}

// "Bearer <inference key>" from TorchServe's key_file.json, or "" while it is missing or unreadable.
function torchserveAuthorization(r) {
    try {
        const keys = JSON.parse(fs.readFileSync(r.variables.torchserve_key_file, 'utf8'));
        return keys.inference.key ? 'Bearer ' + keys.inference.key : '';
    } catch (e) {
        return '';
    }
}

export default {clientAllowed: clientAllowed, torchserveAuthorization: torchserveAuthorization};
